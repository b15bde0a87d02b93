"""Goodput under a spot-preemption trace: Phoenix (with and without acting on the notice,
with a warm standby) vs a Kubernetes Job vs Phoenix without the emergency checkpoint, side by
side on the same lab, at the same time.

The trace: every T seconds the node of each variant's running trainer pod announces its
reclaim, and g seconds later the node is gone. Each variant gets the notice the way it can
use it. For the first three (as before), the notice is a drain: an Eviction with a g-second
grace at the notice (SIGTERM now, gone by the reclaim). For the notice-aware two, it is the
node taint a termination handler sets (``karpenter.sh/disrupted``) at the notice, and at
the reclaim whatever of the variant still runs on that node is evicted with no grace (and the
taint lifted: a fresh node). Notices of different variants are staggered so that only one
node is tainted at a time, and the two notice-aware variants run on node pools of their own
(the lab starts four spot nodes), so a notice meant for one never reaches the other. The
variants train the same model (examples/train_mlp.py) for the same steps:

- phoenix:               a PhoenixJob; the operator resumes from the newest verified
                         checkpoint and the trainer saves an emergency checkpoint on SIGTERM.
                         Notices ignored (recovery.onNotice Ignore): today's behaviour.
- phoenix-no-emergency:  the same without the emergency checkpoint (--no-emergency-checkpoint):
                         every preemption loses the steps since the last periodic checkpoint.
- job-podfailurepolicy:  a batch/v1 Job with podFailurePolicy (DisruptionTarget -> Ignore)
                         and backoffLimit; the same trainer finds its newest checkpoint by
                         itself when the Job controller restarts the pod.
- phoenix-notice-aware:  onNotice Handoff: on the taint the trainer checkpoints, a
                         replacement starts on another node and gets ready while the old pod
                         trains, then the old pod hands off at a step boundary (0 steps lost).
- phoenix-standby:       recovery.standby: a warm standby is always there; the handoff
                         happens as soon as the notice is seen.

goodput = useful training time / wall time, where useful training time is what the same
training takes uninterrupted and wall time runs from the job's creation to its completion
(scheduling, start-up, restarts, lost steps all count against it). The uninterrupted run is
the reference every Phoenix sample uses (phoenix_lab.samples.ReferenceRun): the same config
as a PhoenixJob on the on-demand node, in the same trainer image, started alongside and
never preempted. Its training seconds are the useful time, its final checkpoint the weights
every variant must end with, and `goodputVsUninterruptedJob` is its wall time over each
variant's, i.e. what the trace alone cost. Results go to JSON.

    .venv/bin/python benchmarks/bench_goodput.py --out benchmarks/results/goodput.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kubernetes import client

from phoenix_lab import samples
from phoenix_lab.cluster import Lab, LabPorts
from phoenix_lab.install import install_phoenix

from benchlab import PodTimeline, dump_diagnostics, trainer_job

NAMESPACE = "goodput"
BUCKET = "goodput"


NOTICE_TAINT = "karpenter.sh/disrupted"
POOL_LABEL = "goodput/pool"
STAGGER_SECONDS = 22.0  # between variants' notices: one tainted node at a time


@dataclass
class Variant:
    name: str
    kind: str  # "phoenix" | "job"
    prefix: str
    extra_args: list[str] = field(default_factory=list)
    recovery: dict = field(default_factory=dict)  # merged into the PhoenixJob's recovery
    notice: str = "drain"  # "drain": eviction with grace g; "taint": taint now, gone at +g
    pool: str | None = None  # node pool (POOL_LABEL value) of its own
    offset: float = 0.0  # its notices come this much after the trace's period
    first_pod: str | None = None  # a Job's first pod (generated name), once seen
    missed: int = 0  # notices that found no running pod (it was still recovering)
    created: float = 0.0
    finished: float | None = None
    preemptions: list[dict] = field(default_factory=list)
    result: dict = field(default_factory=dict)

    @property
    def resource(self) -> str:
        return self.name


def job_manifest(v: Variant, cfg: samples.TrainConfig, s3_url: str, grace: int, image: str) -> dict:
    """A batch/v1 Job whose trainer resumes from its own newest checkpoint."""
    return trainer_job(v.name, NAMESPACE, cfg.args() + v.extra_args, f"s3://{BUCKET}/{v.prefix}/train",
                       s3_url, image, grace=grace, checkpoint_every=cfg.checkpoint_every,
                       labels={"goodput/variant": v.name})


class Bench:
    def __init__(self, lab: Lab, cfg: samples.TrainConfig, period: float, notice: int,
                 max_notices: int | None = None) -> None:
        self.lab, self.cfg, self.period, self.notice = lab, cfg, period, notice
        self.max_notices = max_notices
        self.api = lab.api_client()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def selector(self, v: Variant) -> str:
        return (f"phoenix.dev/job={v.name},phoenix.dev/phase=train" if v.kind == "phoenix"
                else f"goodput/variant={v.name}")

    def running_pod(self, v: Variant):
        """The variant's active trainer pod, running (never a standby)."""
        active = None
        if v.kind == "phoenix":
            job = self.custom.get_namespaced_custom_object("phoenix.dev", "v1alpha1", NAMESPACE,
                                                           "phoenixjobs", v.name)
            active = samples.job_phase(job).get("pod")
        for pod in self.core.list_namespaced_pod(NAMESPACE, label_selector=self.selector(v)).items:
            if pod.status.phase == "Running" and not pod.metadata.deletion_timestamp and \
                    (active is None or pod.metadata.name == active):
                return pod
        return None

    def done(self, v: Variant) -> bool:
        if v.kind == "phoenix":
            job = self.custom.get_namespaced_custom_object("phoenix.dev", "v1alpha1", NAMESPACE,
                                                           "phoenixjobs", v.name)
            phase = (job.get("status") or {}).get("phase")
            if phase == "Failed":
                raise RuntimeError(f"{v.name} failed: {job['status'].get('conditions')}")
            return phase == "Succeeded"
        job = self.batch.read_namespaced_job(v.name, NAMESPACE)
        conds = {c.type: c.status for c in job.status.conditions or []}
        if conds.get("Failed") == "True":
            raise RuntimeError(f"{v.name} failed")
        return conds.get("Complete") == "True"

    def create(self, v: Variant) -> None:
        if v.kind == "phoenix":
            cfg = samples.TrainConfig(**{**asdict(self.cfg), "extra_args": v.extra_args})
            body = samples.phoenixjob(v.name, NAMESPACE, cfg, f"s3://{BUCKET}/{v.prefix}",
                                      self.lab.s3.url, image=self.lab.trainer_image,
                                      grace_seconds=self.notice)
            body["spec"]["recovery"].update(v.recovery)
            if v.pool:
                body["spec"]["template"]["spec"]["nodeSelector"][POOL_LABEL] = v.pool
            self.custom.create_namespaced_custom_object("phoenix.dev", "v1alpha1", NAMESPACE,
                                                        "phoenixjobs", body)
        else:
            self.batch.create_namespaced_job(NAMESPACE, job_manifest(
                v, self.cfg, self.lab.s3.url, self.notice, self.lab.trainer_image))
        v.created = time.time()

    def drive(self, v: Variant, deadline: float, errors: list) -> None:
        """Follow the trace for one variant: a notice every `period` seconds until done."""
        try:
            next_notice = v.created + self.period + v.offset
            while time.time() < deadline:
                if self.done(v):
                    v.finished = time.time()
                    return
                if v.first_pod is None and v.kind == "job":
                    pod = self.running_pod(v)
                    v.first_pod = pod.metadata.name if pod is not None else None
                given = len(v.preemptions) + v.missed
                if time.time() >= next_notice and (self.max_notices is None or given < self.max_notices):
                    # A reclaim hits whatever runs then; nothing running (still recovering
                    # from the last one): nothing to hit. Waiting for the next pod instead
                    # would evict it the moment it starts, over and over (the Job's pods,
                    # whose backoff grows with every restart, never trained again).
                    pod = self.running_pod(v)
                    if pod is not None:
                        self.notify(v, pod)
                    else:
                        v.missed += 1
                    next_notice += self.period
                time.sleep(0.1)
            raise TimeoutError(f"{v.name} did not finish in time")
        except Exception as e:  # reported by the main thread
            errors.append(f"{v.name}: {e}")

    def notify(self, v: Variant, pod) -> None:
        """One notice of the trace to ``pod``'s node, and the reclaim g seconds later."""
        now, node = time.time(), pod.spec.node_name
        v.preemptions.append({"pod": pod.metadata.name, "node": node, "time": now})
        if v.notice == "drain":
            self.lab.evict(NAMESPACE, pod.metadata.name, grace_seconds=self.notice)
            return
        self.lab.kubectl("taint", "nodes", node, f"{NOTICE_TAINT}:NoSchedule")
        try:
            time.sleep(max(0.0, now + self.notice - time.time()))
            for p in self.core.list_namespaced_pod(NAMESPACE, label_selector=self.selector(v),
                                                   field_selector=f"spec.nodeName={node}").items:
                if p.status.phase in ("Pending", "Running") and not p.metadata.deletion_timestamp:
                    self.lab.evict(NAMESPACE, p.metadata.name, grace_seconds=0)
                    v.preemptions[-1].setdefault("reclaimed", []).append(p.metadata.name)
        finally:
            self.lab.kubectl("taint", "nodes", node, f"{NOTICE_TAINT}:NoSchedule-", check=False)


def first_pod(v: Variant) -> str:
    """The name of a variant's first trainer pod (a Job's pods have generated names)."""
    if v.kind == "phoenix":
        from phoenix_operator.podspec import pod_name

        return pod_name(v.name, "train", 1)
    return v.first_pod or ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--step-delay", type=float, default=0.1, help="seconds per step (the 'GPU work')")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--period", type=float, default=150.0, help="T: seconds between preemption notices")
    ap.add_argument("--notice", type=int, default=15, help="g: seconds of notice (eviction grace)")
    ap.add_argument("--max-notices", type=int, default=None,
                    help="notices per variant at most: the same count for every variant (the "
                         "staggered schedule gives later variants fewer in a short run)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/goodput.json"))
    args = ap.parse_args(argv)
    cfg = samples.TrainConfig(steps=args.steps, step_delay=args.step_delay,
                              checkpoint_every=args.checkpoint_every)

    state = Path(tempfile.mkdtemp(prefix="phoenix-goodput-"))
    lab = Lab(state / "lab", ports=LabPorts.ephemeral(), spot_nodes=4)
    timeline = None
    try:
        lab.up()
        install_phoenix(lab)
        spot = sorted(n for n in lab.node_names if "spot" in n)
        for node, pool in zip(spot, ("a", "a", "b", "b")):
            lab.kubectl("label", "nodes", node, f"{POOL_LABEL}={pool}", "--overwrite")
        lab.kubectl("create", "namespace", NAMESPACE)
        lab.kubectl("apply", "-f", "-", input=json.dumps(samples.credentials_secret(NAMESPACE, lab.s3)))
        lab.s3_server.ensure_bucket(BUCKET)
        run = uuid.uuid4().hex[:6]
        ignore = {"onNotice": "Ignore"}
        variants = [
            Variant("phoenix", "phoenix", f"{run}/phoenix", recovery=ignore),
            Variant("phoenix-no-emergency", "phoenix", f"{run}/no-emergency",
                    ["--no-emergency-checkpoint"], recovery=ignore),
            Variant("job-podfailurepolicy", "job", f"{run}/job"),
            Variant("phoenix-notice-aware", "phoenix", f"{run}/notice-aware",
                    recovery={"onNotice": "Handoff"}, notice="taint", pool="a"),
            Variant("phoenix-standby", "phoenix", f"{run}/standby",
                    recovery={"onNotice": "Handoff", "standby": True}, notice="taint", pool="b"),
        ]
        for i, v in enumerate(variants):
            v.offset = i * STAGGER_SECONDS
        bench = Bench(lab, cfg, args.period, args.notice, args.max_notices)
        timeline = PodTimeline(bench.api, NAMESPACE)
        timeline.start()
        reference_run = samples.ReferenceRun(lab, NAMESPACE, "phoenix-uninterrupted", cfg,
                                             f"s3://{BUCKET}/{run}/uninterrupted")
        reference: dict = {}

        def run_reference() -> None:
            try:
                reference_run.wait(timeout=args.timeout)
                reference["finished"] = time.time()
            except Exception as e:  # reported by the main thread
                errors.append(f"reference: {e}")

        errors: list[str] = []
        deadline = time.time() + args.timeout
        threads = []
        for v in variants:
            bench.create(v)
            threads.append(threading.Thread(target=bench.drive, args=(v, deadline, errors), name=v.name))
        reference_run.start()
        reference["created"] = time.time()
        threads.append(threading.Thread(target=run_reference, name="reference"))
        print(f"[goodput] {len(variants)} variants + reference running; {cfg.steps} steps at "
              f"{cfg.step_delay}s, notice every {args.period:.0f}s with {args.notice}s grace", flush=True)
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(10)
            print("[goodput] " + ", ".join(
                f"{v.name}: {'done' if v.finished else 'running'} ({len(v.preemptions)} preemptions)"
                for v in variants) + f", reference: {'done' if 'finished' in reference else 'running'}",
                flush=True)
        if errors or "finished" not in reference:
            print("[goodput] errors: " + "; ".join(errors or ["reference run failed"]), file=sys.stderr)
            return 1
        reference["seconds"] = reference_run.train_seconds()
        reference_storage = reference_run.storage()
        results = []
        for v in variants:
            storage = samples.open_phase_storage(f"s3://{BUCKET}/{v.prefix}/train", lab.s3)
            starts, reached = samples.attempt_starts(storage), samples.attempt_ends(storage)
            order = sorted(starts)
            lost = sum(max(0, reached.get(a, starts[a][0]) - starts[b][0]) for a, b in zip(order, order[1:]))
            same, _ = samples.final_weights_equal(storage, reference_storage)
            wall = v.finished - v.created
            # Seconds from each notice until the next attempt was training again (its
            # start/resume record): detection, new pod, start-up, checkpoint load. For the
            # notice-aware variants the old attempt trains on for part of it; the pause is
            # what training actually lost: old attempt's end record -> new one's start.
            resume = [round(starts[b][1] - p["time"], 2) for p, b in zip(v.preemptions, order[1:])]
            ended = samples.attempt_end_times(storage)
            pause = [round(starts[b][1] - ended[a], 2) for a, b in zip(order, order[1:]) if a in ended]
            results.append({"variant": v.name, "wallSeconds": round(wall, 2),
                            "preemptions": len(v.preemptions), "noticesMissed": v.missed,
                            "attempts": len(order),
                            "stepsLost": lost, "goodput": round(reference["seconds"] / wall, 4),
                            "firstStartSeconds": round(starts[order[0]][1] - v.created, 2),
                            "firstStart": timeline.first_start(first_pod(v), v.created,
                                                               starts[order[0]][1]),
                            "resumeSeconds": resume,
                            "resumeSecondsP50": round(statistics.median(resume), 2) if resume else None,
                            "pauseSeconds": pause,
                            "finalWeightsEqualReference": same})
        control = reference["finished"] - reference["created"]
        for r in results:
            # The same ratio with the control job as "useful": what the trace alone cost.
            r["goodputVsUninterruptedJob"] = round(control / r["wallSeconds"], 4)
        phoenix = results[0]["goodput"]
        by = {r["variant"]: r for r in results}
        baselines = ("phoenix-no-emergency", "job-podfailurepolicy")
        best = max(r["goodput"] for r in results if r["variant"] not in baselines)
        # The hang rule's false positives under this trace (default rule): none allowed.
        hung = [e.involved_object.name for e in bench.core.list_namespaced_event(
            NAMESPACE, field_selector="reason=Hung").items]
        report = {
            "benchmark": "goodput under a spot preemption trace",
            "hungEvents": hung,
            "trace": {"periodSeconds": args.period, "noticeSeconds": args.notice,
                      "maxNotices": args.max_notices, "staggerSeconds": STAGGER_SECONDS},
            "training": {"steps": cfg.steps, "stepDelaySeconds": cfg.step_delay,
                         "checkpointEverySteps": cfg.checkpoint_every,
                         "uninterruptedTrainSeconds": round(reference["seconds"], 2),
                         "uninterruptedWallSeconds": round(control, 2)},
            "results": results,
            "goals": {"phoenixGoodputAtLeast0.95": phoenix >= 0.95,
                      "phoenixAheadOfBoth": all(phoenix > by[b]["goodput"] for b in baselines),
                      "standbyAtLeast0.995OfControl":
                          by["phoenix-standby"]["goodputVsUninterruptedJob"] >= 0.995,
                      "standbyNoticeToTrainingP50AtMost1s":
                          (by["phoenix-standby"]["resumeSecondsP50"] or 99) <= 1.0,
                      "noticeAwareAtLeast0.985OfControl":
                          by["phoenix-notice-aware"]["goodputVsUninterruptedJob"] >= 0.985,
                      "everyPhoenixAheadOfEveryBaseline": all(
                          r["goodput"] > max(by[b]["goodput"] for b in baselines)
                          for r in results if r["variant"] not in baselines),
                      "bestPhoenixGoodput": best,
                      "noHungEvent": not hung},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return 0
    finally:
        if timeline is not None:
            timeline.stop()
        try:
            where = dump_diagnostics(lab, NAMESPACE, state / "diagnostics")
            print(f"[goodput] operator log, events, pods, jobs: {where}", flush=True)
        except Exception as e:  # noqa: BLE001 - the lab may be half up; never hide the result
            print(f"[goodput] no diagnostics: {e}", file=sys.stderr)
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
