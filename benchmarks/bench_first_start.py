"""First start: from creating the job until its trainer trains, for a PhoenixJob and, as the
baseline, a batch/v1 Job running the same trainer image with the same arguments; one job at a
time on an otherwise idle lab, the kinds alternating; where the seconds go.

Two modes. By default each job starts from nothing (a new run: the goodput benchmark's first
start). With ``--resume-hidden H`` each job starts where a checkpoint of examples/train_mlp.py
with ``--hidden H`` already waits in its prefix (about 12·H² bytes: 8192 gives 0.8 GB; a
re-created job, or any replacement pod without a standby), and a third kind joins: the
PhoenixJob with the start-up prefetch turned off (``PHOENIX_PREFETCH=0``), so the prefetch
(on by default) is measured against the same start without it. The checkpoint is written once by a seed job; every measured job gets the same
files as hard links in the S3 server's posix backend (the store reports the same sizes and
checksums for them) and resumes from it. ``--s3-mbit N`` caps what the S3 server sends
to pods (a token bucket on each node's bridge) at a remote object store's pace; without it
the S3 server is on the same two cores, and a download is as much CPU as it is waiting.

Each job trains a few steps and is deleted (its pods gone) before the next is created, so no
start competes with another for the CPU (bench_goodput starts six trainers at once: its
first starts measure the contention as much as the start). Marks, in seconds from the create
call: the pod object created (for a PhoenixJob: the operator's first pass), bound to a node,
the trainer process started (the kernel's start time, from the trainer's start record), the
trainer training (its start record); and when the kubelet reported the pod Running (after
the process started). The trainer's own
part is split into ``beforeSession`` (interpreter, imports, model build: the script) and
``restore`` (the runtime: finding and loading the checkpoint, starting its threads).

    .venv/bin/python benchmarks/bench_first_start.py --rounds 5 --out benchmarks/results/first-start.json
    .venv/bin/python benchmarks/bench_first_start.py --rounds 4 --resume-hidden 8192 \
        --s3-mbit 1600 --out benchmarks/results/first-start-resume.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

from kubernetes import client

from phoenix_lab import samples
from phoenix_lab.cluster import Lab, LabPorts
from phoenix_trainer.core.layout import step_dir_name

from benchlab import LabBench, install_with_namespace, trainer_job

NAMESPACE = "first-start"
BUCKET = "first-start"
# In the order they happen; "running" (the kubelet's report that the pod runs) comes after
# the process started, so it is kept beside them, not between.
MARKS = ("created", "scheduled", "process", "training")


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Bench(LabBench):
    def __init__(self, lab: Lab, cfg: samples.TrainConfig, run: str) -> None:
        super().__init__(lab, cfg, run, NAMESPACE)
        self.batch = client.BatchV1Api(self.api)
        self.seed_step: int | None = None  # resume mode: the seed's checkpoint every job gets

    def prefix(self, name: str) -> str:
        return f"s3://{BUCKET}/{self.run}/{name}"

    def create(self, kind: str, name: str) -> float:
        """Create the job; the time just before the create call (a user's `kubectl apply`)."""
        if kind.startswith("phoenix"):
            body = samples.phoenixjob(name, NAMESPACE, self.cfg, self.prefix(name), self.lab.s3.url,
                                      image=self.lab.trainer_image)
            if kind == "phoenix-no-prefetch":  # a trainer setting: the template's env
                container = body["spec"]["template"]["spec"]["containers"][0]
                container["env"] = [*container.get("env", ()), {"name": "PHOENIX_PREFETCH", "value": "0"}]
            t0 = time.time()
            self.custom.create_namespaced_custom_object("phoenix.dev", "v1alpha1", NAMESPACE,
                                                        "phoenixjobs", body)
        else:
            body = trainer_job(name, NAMESPACE, self.cfg.args(), f"{self.prefix(name)}/train",
                               self.lab.s3.url, self.lab.trainer_image, grace=10,
                               checkpoint_every=self.cfg.checkpoint_every,
                               labels={"first-start/job": name})
            t0 = time.time()
            self.batch.create_namespaced_job(NAMESPACE, body)
        return t0

    def seed(self, timeout: float = 900) -> int:
        """Run the seed job once; the step of the (non-final) checkpoint jobs resume from."""
        self.one("phoenix", "seed", timeout=timeout)
        self.delete("phoenix", "seed")
        storage = samples.open_phase_storage(f"{self.prefix('seed')}/train", self.lab.s3)
        from phoenix_trainer.core.layout import checkpoint_steps

        steps = [s for s in checkpoint_steps(storage) if s < self.cfg.steps]
        if not steps:
            raise RuntimeError(f"the seed left no checkpoint before its last step: {checkpoint_steps(storage)}")
        self.seed_step = steps[-1]
        return self.seed_step

    def place(self, name: str) -> None:
        """The seed's checkpoint, under ``name``'s prefix, as hard links (no bytes copied)."""
        assert self.seed_step is not None
        d = step_dir_name(self.seed_step)
        data = self.lab.s3_server.data_dir / BUCKET / self.run
        source, target = data / "seed" / "train" / d, data / name / "train" / d
        target.mkdir(parents=True)
        for f in source.iterdir():
            os.link(f, target / f.name)

    def remove(self, name: str) -> None:
        """Every object under ``name``'s prefix (a resumed job writes a full checkpoint)."""
        s3 = self.lab.s3.client()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                  Prefix=f"{self.run}/{name}/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})

    def done(self, kind: str, name: str) -> bool:
        if kind.startswith("phoenix"):
            job = self.custom.get_namespaced_custom_object("phoenix.dev", "v1alpha1", NAMESPACE,
                                                           "phoenixjobs", name)
            phase = (job.get("status") or {}).get("phase")
            if phase == "Failed":
                raise RuntimeError(f"{name} failed: {json.dumps(job['status'])[:2000]}")
            return phase == "Succeeded"
        conds = {c.type: c.status for c in self.batch.read_namespaced_job(name, NAMESPACE).status.conditions or []}
        if conds.get("Failed") == "True":
            raise RuntimeError(f"{name} failed")
        return conds.get("Complete") == "True"

    def pods(self, kind: str, name: str) -> list:
        selector = f"phoenix.dev/job={name}" if kind.startswith("phoenix") else f"first-start/job={name}"
        return self.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items

    def delete(self, kind: str, name: str, timeout: float = 120) -> None:
        """Delete the job and wait until its pods are gone: the next start finds an idle lab."""
        body = client.V1DeleteOptions(propagation_policy="Foreground")
        if kind.startswith("phoenix"):
            self.custom.delete_namespaced_custom_object("phoenix.dev", "v1alpha1", NAMESPACE,
                                                        "phoenixjobs", name, body=body)
        else:
            self.batch.delete_namespaced_job(name, NAMESPACE, body=body)
        deadline = time.monotonic() + timeout
        while self.pods(kind, name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pods of {name} were not gone after {timeout:.0f}s")
            time.sleep(0.5)

    def one(self, kind: str, name: str, timeout: float = 300) -> dict:
        """One job from creation to completion; its marks."""
        t0 = self.create(kind, name)
        deadline = time.monotonic() + timeout
        while not self.done(kind, name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not complete in {timeout:.0f}s")
            time.sleep(0.25)
        pods = self.pods(kind, name)
        if len(pods) != 1:
            raise RuntimeError(f"{name}: expected one pod (an undisturbed first start), found "
                               f"{[p.metadata.name for p in pods]}")
        storage = samples.open_phase_storage(f"{self.prefix(name)}/train", self.lab.s3)
        from phoenix_trainer.attempt_log import read_metrics

        start = next(r for r in read_metrics(storage) if r.get("event") in ("start", "resume"))
        if (start["event"] == "resume") != (self.seed_step is not None):
            raise RuntimeError(f"{name}: a {start['event']} record; expected the other")
        startup = start.get("startup") or {}
        marks = self.timeline.seen.get(pods[0].metadata.name, {})
        out = {k: round(marks[k] - t0, 3) for k in ("created", "scheduled", "running") if k in marks}
        if "processStart" in startup:
            out["process"] = round(_unix(startup["processStart"]) - t0, 3)
        out["training"] = round(_unix(start["time"]) - t0, 3)
        return {"kind": kind, "job": name, "pod": pods[0].metadata.name,
                "node": pods[0].spec.node_name, "marks": out,
                "trainer": {k: startup[k] for k in ("beforeSession", "restore") if k in startup},
                "prefetch": startup.get("prefetch")}


def summarize(runs: list[dict]) -> dict:
    """Medians of each mark and of each step between marks."""
    out: dict = {}
    for kind in sorted({r["kind"] for r in runs}):
        mine = [r for r in runs if r["kind"] == kind]
        marks = {m: round(statistics.median(r["marks"][m] for r in mine), 3)
                 for m in (*MARKS, "running") if all(m in r["marks"] for r in mine)}
        steps, prev = {}, None
        for m in MARKS:
            if m in marks:
                steps[f"{prev or 'create'}->{m}"] = round(
                    statistics.median(r["marks"][m] - (r["marks"][prev] if prev else 0) for r in mine), 3)
                prev = m
        trainer = {k: round(statistics.median(r["trainer"][k] for r in mine), 3)
                   for k in ("beforeSession", "restore") if all(k in r["trainer"] for r in mine)}
        out[kind] = {"runs": len(mine), "medianSeconds": marks, "medianStepSeconds": steps,
                     "trainerMedianSeconds": trainer,
                     "trainingSeconds": sorted(r["marks"]["training"] for r in mine)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured jobs of each kind")
    ap.add_argument("--warmup", type=int, default=1,
                    help="jobs of each kind run first and not counted (cold page cache)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resume-hidden", type=int, default=0,
                    help="resume from a checkpoint of train_mlp.py --hidden H (0: start from nothing)")
    ap.add_argument("--s3-mbit", type=int, default=0,
                    help="cap the S3 server's sending to pods at this many Mbit/s (0: no cap)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/first-start.json"))
    args = ap.parse_args(argv)
    resume = args.resume_hidden > 0
    if resume:  # the seed checkpoints at half way; jobs resume there and train the rest
        steps = max(2, min(args.steps, 4))
        cfg = samples.TrainConfig(steps=steps, step_delay=0.0, checkpoint_every=steps // 2,
                                  extra_args=["--hidden", str(args.resume_hidden)])
        kinds = ("phoenix", "phoenix-no-prefetch", "job")
    else:
        cfg = samples.TrainConfig(steps=args.steps, step_delay=0.0, checkpoint_every=10)
        kinds = ("phoenix", "job")

    state = Path(tempfile.mkdtemp(prefix="phoenix-first-start-"))
    lab = Lab(state / "lab", ports=LabPorts.ephemeral())
    bench = None
    try:
        lab.up()
        install_with_namespace(lab, NAMESPACE, BUCKET)
        bench = Bench(lab, cfg, uuid.uuid4().hex[:6])
        if resume:
            step = bench.seed()
            print(f"[first-start] seed checkpoint at step {step} (--hidden {args.resume_hidden});"
                  f" every job resumes from it", flush=True)
        if args.s3_mbit:
            for bridge in lab.net.bridges():  # gone with the lab
                subprocess.run(["tc", "qdisc", "replace", "dev", bridge, "root", "tbf", "rate",
                                f"{args.s3_mbit}mbit", "burst", "1mb", "latency", "200ms"], check=True)
            print(f"[first-start] S3 -> pods capped at {args.s3_mbit} Mbit/s", flush=True)
        runs: list[dict] = []
        for i in range(args.warmup + args.rounds):
            # Rotate which kind goes first, so none always follows another's teardown.
            for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                name = f"{kind}-{i}"
                if resume:
                    bench.place(name)
                r = bench.one(kind, name)
                bench.delete(kind, name)
                bench.remove(name)
                counted = i >= args.warmup
                pre = r["prefetch"] or {}
                print(f"[first-start] {'round ' + str(i - args.warmup + 1) if counted else 'warm-up'}"
                      f" {kind}: training {r['marks']['training']:.2f}s after creation "
                      f"({', '.join(f'{k} {v:.2f}' for k, v in r['marks'].items())}; trainer "
                      f"{', '.join(f'{k} {v:.2f}' for k, v in r['trainer'].items())}"
                      + (f"; prefetched {pre.get('bytes', 0) / 1e6:.0f} MB in {pre.get('seconds', 0):.2f}s,"
                         f" restore waited {pre.get('waited', 0):.2f}s" if pre else "") + ")", flush=True)
                if counted:
                    runs.append(r)
        summary = summarize(runs)
        p50 = {k: summary[k]["medianSeconds"]["training"] for k in kinds}
        report = {
            "benchmark": "first start: creation -> training, one job at a time on an idle lab",
            "mode": f"resume from a train_mlp --hidden {args.resume_hidden} checkpoint" if resume
                    else "a new run (no checkpoint)",
            "s3MbitPerSecondCap": args.s3_mbit or None,
            "training": {"steps": cfg.steps, "args": cfg.args()},
            "rounds": args.rounds, "warmup": args.warmup,
            "summary": summary,
            "phoenixOverJobTrainingP50": round(p50["phoenix"] / p50["job"], 3),
            "runs": runs,
        }
        if resume:
            report["prefetchOverNoPrefetchTrainingP50"] = round(p50["phoenix"] / p50["phoenix-no-prefetch"], 3)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
        return 0
    finally:
        if bench is not None:
            bench.timeline.stop()
        lab.down()
        # The seed's checkpoints and every resumed job's (GBs with --resume-hidden): the
        # figures are in the JSON; the lab's logs stay.
        shutil.rmtree(lab.s3_server.data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
