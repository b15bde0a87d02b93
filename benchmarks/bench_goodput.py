"""Goodput under a spot-preemption trace: Phoenix vs a Kubernetes Job vs Phoenix without
the emergency checkpoint, side by side on the same lab, at the same time.

The trace: every T seconds the running trainer pod of each variant gets a preemption notice
of g seconds (an Eviction with a g-second grace, which is what a spot reclaim becomes on
Kubernetes). The variants train the same model (examples/train_mlp.py) for the same steps:

- phoenix:               a PhoenixJob; the operator resumes from the newest verified
                         checkpoint and the trainer saves an emergency checkpoint on SIGTERM.
- phoenix-no-emergency:  the same without the emergency checkpoint (--no-emergency-checkpoint):
                         every preemption loses the steps since the last periodic checkpoint.
- job-podfailurepolicy:  a batch/v1 Job with podFailurePolicy (DisruptionTarget -> Ignore)
                         and backoffLimit; the same trainer finds its newest checkpoint by
                         itself when the Job controller restarts the pod.

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

NAMESPACE = "goodput"
BUCKET = "goodput"


@dataclass
class Variant:
    name: str
    kind: str  # "phoenix" | "job"
    prefix: str
    extra_args: list[str] = field(default_factory=list)
    created: float = 0.0
    finished: float | None = None
    preemptions: list[dict] = field(default_factory=list)
    result: dict = field(default_factory=dict)

    @property
    def resource(self) -> str:
        return self.name


def job_manifest(v: Variant, cfg: samples.TrainConfig, s3_url: str, grace: int, image: str) -> dict:
    """A batch/v1 Job whose trainer resumes from its own newest checkpoint."""
    env = [{"name": "PHOENIX_CHECKPOINT_URI", "value": f"s3://{BUCKET}/{v.prefix}/train"},
           {"name": "PHOENIX_CHECKPOINT_INTERVAL_STEPS", "value": str(cfg.checkpoint_every)},
           {"name": "PHOENIX_GRACE_SECONDS", "value": str(grace)},
           {"name": "PHOENIX_PHASE", "value": "train"},
           {"name": "AWS_ENDPOINT_URL", "value": s3_url}] + [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": samples.CREDENTIALS_SECRET, "key": k}}}
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": v.name, "namespace": NAMESPACE},
        "spec": {
            "backoffLimit": 3,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                      "values": [1]}},
            ]},
            "template": {"metadata": {"labels": {"goodput/variant": v.name}},
                         "spec": {**samples.trainer_pod_spec(image, cfg.args() + v.extra_args, env),
                                  "restartPolicy": "Never",
                                  "terminationGracePeriodSeconds": grace}},
        },
    }


class Bench:
    def __init__(self, lab: Lab, cfg: samples.TrainConfig, period: float, notice: int) -> None:
        self.lab, self.cfg, self.period, self.notice = lab, cfg, period, notice
        self.api = lab.api_client()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def selector(self, v: Variant) -> str:
        return (f"phoenix.dev/job={v.name},phoenix.dev/phase=train" if v.kind == "phoenix"
                else f"goodput/variant={v.name}")

    def running_pod(self, v: Variant):
        for pod in self.core.list_namespaced_pod(NAMESPACE, label_selector=self.selector(v)).items:
            if pod.status.phase == "Running" and not pod.metadata.deletion_timestamp:
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
            self.custom.create_namespaced_custom_object("phoenix.dev", "v1alpha1", NAMESPACE,
                                                        "phoenixjobs", body)
        else:
            self.batch.create_namespaced_job(NAMESPACE, job_manifest(
                v, self.cfg, self.lab.s3.url, self.notice, self.lab.trainer_image))
        v.created = time.time()

    def drive(self, v: Variant, deadline: float, errors: list) -> None:
        """Follow the trace for one variant: a notice every `period` seconds until done."""
        try:
            next_notice = v.created + self.period
            while time.time() < deadline:
                if self.done(v):
                    v.finished = time.time()
                    return
                if time.time() >= next_notice:
                    pod = self.running_pod(v)
                    if pod is not None:
                        self.lab.evict(NAMESPACE, pod.metadata.name, grace_seconds=self.notice)
                        v.preemptions.append({"pod": pod.metadata.name, "time": time.time()})
                        next_notice += self.period
                time.sleep(0.25)
            raise TimeoutError(f"{v.name} did not finish in time")
        except Exception as e:  # reported by the main thread
            errors.append(f"{v.name}: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--step-delay", type=float, default=0.1, help="seconds per step (the 'GPU work')")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--period", type=float, default=150.0, help="T: seconds between preemption notices")
    ap.add_argument("--notice", type=int, default=15, help="g: seconds of notice (eviction grace)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/goodput.json"))
    args = ap.parse_args(argv)
    cfg = samples.TrainConfig(steps=args.steps, step_delay=args.step_delay,
                              checkpoint_every=args.checkpoint_every)

    state = Path(tempfile.mkdtemp(prefix="phoenix-goodput-"))
    lab = Lab(state / "lab", ports=LabPorts.ephemeral())
    try:
        lab.up()
        install_phoenix(lab)
        lab.kubectl("create", "namespace", NAMESPACE)
        lab.kubectl("apply", "-f", "-", input=json.dumps(samples.credentials_secret(NAMESPACE, lab.s3)))
        lab.s3_server.ensure_bucket(BUCKET)
        run = uuid.uuid4().hex[:6]
        variants = [
            Variant("phoenix", "phoenix", f"{run}/phoenix"),
            Variant("phoenix-no-emergency", "phoenix", f"{run}/no-emergency", ["--no-emergency-checkpoint"]),
            Variant("job-podfailurepolicy", "job", f"{run}/job"),
        ]
        bench = Bench(lab, cfg, args.period, args.notice)
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
            # start/resume record): detection, new pod, start-up, checkpoint load.
            resume = [round(starts[b][1] - p["time"], 2) for p, b in zip(v.preemptions, order[1:])]
            results.append({"variant": v.name, "wallSeconds": round(wall, 2),
                            "preemptions": len(v.preemptions), "attempts": len(order),
                            "stepsLost": lost, "goodput": round(reference["seconds"] / wall, 4),
                            "firstStartSeconds": round(starts[order[0]][1] - v.created, 2),
                            "resumeSeconds": resume,
                            "finalWeightsEqualReference": same})
        control = reference["finished"] - reference["created"]
        for r in results:
            # The same ratio with the control job as "useful": what the trace alone cost.
            r["goodputVsUninterruptedJob"] = round(control / r["wallSeconds"], 4)
        phoenix = results[0]["goodput"]
        report = {
            "benchmark": "goodput under a spot preemption trace",
            "trace": {"periodSeconds": args.period, "noticeSeconds": args.notice},
            "training": {"steps": cfg.steps, "stepDelaySeconds": cfg.step_delay,
                         "checkpointEverySteps": cfg.checkpoint_every,
                         "uninterruptedTrainSeconds": round(reference["seconds"], 2),
                         "uninterruptedWallSeconds": round(control, 2)},
            "results": results,
            "goals": {"phoenixGoodputAtLeast0.95": phoenix >= 0.95,
                      "phoenixAheadOfBoth": all(phoenix > r["goodput"] for r in results[1:])},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return 0
    finally:
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
