"""Hang detection on the lab's real nodes: from a trainer's last step to its pod's end.

One PhoenixJob runs the example MLP (the trainer image, the chart's operator) with a hang
injected into each of its first ``--rounds`` attempts (``train_mlp.py --hang-at 20 --hang
loop --hang-attempts N``: the loop waits for ever 20 steps after the attempt started, the
process stays Running and keeps its heartbeat thread). Every hang must be detected, ended as
a ``Hung`` failure and replaced; the last attempt completes.

Per round:
- **detection**: from the last step (the attempt's final heartbeat's ``lastProgressAt``, the
  trainer's own clock - the lab's nodes share this machine's) to the moment a watch sees the
  pod's trainer container terminated (or the pod gone);
- **decided at**: the stall the operator saw when it decided (``Hung`` event: "no step for
  Ns"), against the timeout: honoured within 10 % (``--timeout`` given) or the default rule.

``--timeout 0`` uses the default rule (10x the p95 step time, at least 180 s): each round then
takes over three minutes.

``--quiet-job`` runs a second job beside the hung one, with the default rule and no hang: it
pauses 60 s before its first step (a slow restore) and 30 s every 100 steps (an evaluation),
and is evicted once (its replacement pauses again). It must Succeed with no ``Hung`` event
(the rule's false positives).

    PYTHONPATH=operator:trainer_image:lab:benchmarks .venv/bin/python \\
        benchmarks/bench_hang.py --rounds 10 --timeout 20 --out benchmarks/results/hang.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kubernetes import client, watch

from phoenix_lab import samples
from phoenix_lab.cluster import Lab, LabPorts
from phoenix_trainer.core.heartbeat import HANG_FLOOR_SECONDS, Heartbeat, heartbeat_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlab import dump_diagnostics, install_with_namespace  # noqa: E402
from benchstats import summary  # noqa: E402

NAMESPACE = "bench-hang"
BUCKET = "bench-hang"
STALL = re.compile(r"no step for (\d+)s \(hang timeout (\d+)s\)")


class EndWatch(threading.Thread):
    """When (unix time, this machine) each trainer pod's container was first seen terminated
    or the pod gone."""

    def __init__(self, api: client.ApiClient, job: str) -> None:
        super().__init__(daemon=True, name="end-watch")
        self.core, self.job = client.CoreV1Api(api), job
        self.ended: dict[str, float] = {}
        self._w = watch.Watch()

    def run(self) -> None:
        for ev in self._w.stream(self.core.list_namespaced_pod, NAMESPACE,
                                 label_selector=f"phoenix.dev/job={self.job}"):
            pod, now = ev["object"], time.time()
            name = pod.metadata.name
            terminated = any(c.state and c.state.terminated
                             for c in (pod.status.container_statuses or ()))
            if (ev["type"] == "DELETED" or terminated) and name not in self.ended:
                self.ended[name] = now

    def stop(self) -> None:
        self._w.stop()


class QuietJob:
    """The job beside the hung one that must not be called hung (``--quiet-job``)."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab, self.name = lab, name
        self.evicted: str | None = None

    def submit(self) -> None:
        cfg = samples.TrainConfig(steps=800, step_delay=0.05, checkpoint_every=20, extra_args=[
            "--pause-at-start", "60", "--eval-every", "100", "--eval-seconds", "30"])
        body = samples.phoenixjob(self.name, NAMESPACE, cfg, f"s3://{BUCKET}/{self.name}",
                                  self.lab.s3.url, image=self.lab.trainer_image)
        self.lab.kubectl("apply", "-f", "-", input=json.dumps(body))

    def _job(self, custom) -> dict:
        return custom.get_namespaced_custom_object(samples.GROUP, samples.VERSION, NAMESPACE,
                                                   samples.PLURAL, self.name)

    def poll(self, custom) -> None:
        """Evict its first pod once it has trained past step 150 (after an evaluation)."""
        if self.evicted:
            return
        train = samples.job_phase(self._job(custom))
        step = ((train.get("progress") or {}).get("step")) or 0
        if step >= 150 and train.get("pod"):
            self.lab.evict(NAMESPACE, train["pod"])
            self.evicted = train["pod"]

    def finish(self, api, custom, deadline: float) -> dict:
        while time.monotonic() < deadline:
            self.poll(custom)
            job = self._job(custom)
            if (job.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                break
            time.sleep(2)
        hung = client.CoreV1Api(api).list_namespaced_event(
            NAMESPACE, field_selector=f"involvedObject.name={self.name},reason=Hung").items
        train = samples.job_phase(job)
        phase = (job.get("status") or {}).get("phase")
        return {"job": self.name, "phase": phase, "evicted": self.evicted,
                "hung_events": len(hung), "hangs": train.get("hangs", 0),
                "preemptions": train.get("preemptions"), "failures": train.get("failures"),
                "ok": phase == "Succeeded" and not hung and not train.get("hangs")
                and bool(self.evicted)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=20, help="hangTimeoutSeconds; 0: the default rule")
    ap.add_argument("--quiet-job", action="store_true",
                    help="also run a job with long pauses and no hang (false positives)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/hang.json"))
    args = ap.parse_args(argv)
    started = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="phoenix-hang-"))
    lab = Lab(state / "lab", ports=LabPorts.ephemeral())
    name = f"hang-{uuid.uuid4().hex[:6]}"
    try:
        lab.up()
        install_with_namespace(lab, NAMESPACE, BUCKET)
        steps = 20 * (args.rounds + 1) + 40
        cfg = samples.TrainConfig(steps=steps, step_delay=0.05, checkpoint_every=10, extra_args=[
            "--hang-at", "20", "--hang", "loop", "--hang-attempts", str(args.rounds)])
        body = samples.phoenixjob(name, NAMESPACE, cfg, f"s3://{BUCKET}/{name}", lab.s3.url,
                                  image=lab.trainer_image, max_failures=args.rounds)
        body["spec"]["recovery"]["backoff"] = {"initialSeconds": 1, "maxSeconds": 2}
        if args.timeout:
            body["spec"]["recovery"]["hangTimeoutSeconds"] = args.timeout
        quiet = QuietJob(lab, f"quiet-{uuid.uuid4().hex[:6]}") if args.quiet_job else None
        with lab.api_client() as api:
            ends = EndWatch(api, name)
            ends.start()
            lab.kubectl("apply", "-f", "-", input=json.dumps(body))
            if quiet is not None:
                quiet.submit()
            custom = client.CustomObjectsApi(api)
            deadline = time.monotonic() + args.rounds * (args.timeout or HANG_FLOOR_SECONDS + 60) * 3 + 600
            while True:
                job = custom.get_namespaced_custom_object(samples.GROUP, samples.VERSION,
                                                          NAMESPACE, samples.PLURAL, name)
                phase = (job.get("status") or {}).get("phase")
                if quiet is not None:
                    quiet.poll(custom)
                if phase in ("Succeeded", "Failed") or time.monotonic() > deadline:
                    break
                time.sleep(2)
            if quiet is not None:
                result_quiet = quiet.finish(api, custom, deadline + 900)
            ends.stop()
            events = client.CoreV1Api(api).list_namespaced_event(
                NAMESPACE, field_selector=f"involvedObject.name={name},reason=Hung").items
        storage = samples.open_phase_storage(f"s3://{BUCKET}/{name}/train", lab.s3)
        rounds = []
        for attempt in range(1, args.rounds + 1):
            pod = f"{name}.train-{attempt}"
            try:
                hb = Heartbeat.from_json(storage.get_bytes(heartbeat_key(attempt, 0)))
            except FileNotFoundError:
                continue
            if pod in ends.ended and hb.last_progress_at:
                rounds.append({"attempt": attempt, "step": hb.step,
                               "detection_seconds": round(ends.ended[pod] - hb.last_progress_at, 2),
                               "stack_dump": bool(hb.stack_dump)})
        decided = []
        for ev in events:
            m = STALL.search(ev.message or "")
            if m:
                decided.append({"stalled": int(m.group(1)), "timeout": int(m.group(2)),
                                "count": ev.count or 1})
        train = samples.job_phase(job)
        stalls = [d["stalled"] for d in decided for _ in range(d["count"])]
        timeouts = {d["timeout"] for d in decided}
        result = {
            "benchmark": "hang",
            "settings": vars(args) | {"out": str(args.out)},
            "job": {"phase": phase, "failures": train.get("failures"), "hangs": train.get("hangs"),
                    "attempts": train.get("attempts")},
            "detection_seconds": summary([r["detection_seconds"] for r in rounds]),
            "decided_after_stall_seconds": summary([float(s) for s in stalls]),
            "timeouts_applied": sorted(timeouts),
            "honoured_within_10_percent": all(t <= s <= 1.1 * t + 1 for d in decided
                                              for s, t in [(d["stalled"], d["timeout"])]),
            "rounds": rounds,
            "wall_seconds": round(time.monotonic() - started, 1),
        }
        if quiet is not None:
            result["quiet_job"] = result_quiet
        if phase != "Succeeded" or len(rounds) < args.rounds or (
                quiet is not None and not result_quiet["ok"]):
            dump_diagnostics(lab, NAMESPACE, state / "diagnostics")
            result["diagnostics"] = str(state / "diagnostics")
    finally:
        lab.down()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    return 0 if phase == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
