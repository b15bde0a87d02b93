"""Recovery latency and operator footprint, on the lab.

A. Time from a trainer pod's termination to its replacement pod being created, over
   parallel x rounds preemptions (Eviction API, the trainer's grace period honoured), for
   - phoenix: a PhoenixJob recovered by the Phoenix operator (which also lists and
     sha256-verifies checkpoints in S3 before every replacement), and
   - job:     a batch/v1 Job with podFailurePolicy (DisruptionTarget -> Ignore) and
              backoffLimit, recovered by kube-controller-manager's Job controller,
   on the same cluster, one kind after the other, measured the same way: a watch on the pods
   records (monotonic clock) the first event showing the old pod terminal or deleted and
   the ADDED event of the replacement. The Job controller backs off (10 s, 20 s, 40 s, ...)
   even for failures its podFailurePolicy ignores, so jobs are preempted in parallel rounds
   to keep the run short; the Phoenix operator replaces a preempted pod without backoff.
   With ``--checkpoint-gb 0 1 10`` the Phoenix part runs once per size: for a size > 0,
   before the jobs start, each job's checkpoint prefix holds two committed checkpoints of
   that size (``--checkpoint-shards`` shards each) written by the runtime's own writer
   (``upload_shards`` per shard, then ``publish_manifest``: sha256, the S3-stored SHA256
   checksums, manifest last), and the fake trainer resumes from them without writing any of
   its own (no periodic, no emergency checkpoint), so every recovery the operator makes
   lists and verifies checkpoints of that size, as after a real trainer's saves. Size 0 is
   the fake trainer's own tiny checkpoints. To fit the disk, one set of shards is uploaded
   through S3 and shared by every job and step as hard links in the S3 server's posix
   backend (the server reports the same size and stored checksum for each link; checked
   before each manifest is published). The Job baseline does not read checkpoints, so it
   is measured once.
B. Operator resident memory and reconcile rate with M PhoenixJobs (suspended, so the lab
   does not have to run M trainer processes on two cores; every job is still listed,
   reconciled, checkpoint-free, and has its status written).

Trainer pods run on the lab's real nodes (kubelet + containerd): the cluster tests' fake
trainer (tests/cluster/fake_trainer.py, from a ConfigMap) in the trainer image, under
restricted Pod Security, on the spot nodes, one GPU each; both kinds use the same pod
template. The operator runs as a local process authenticated as the chart's
ServiceAccount (so its RSS can be read from /proc), like the cluster tests' operator.

    .venv/bin/python benchmarks/bench_recovery.py --out benchmarks/results/recovery.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import client

from phoenix_lab.cluster import Lab, LabPorts
from phoenix_trainer.core.layout import step_dir_name, verify_checkpoint
from phoenix_trainer.core.storage.s3 import S3Storage
from phoenix_trainer.core.writer import publish_manifest, upload_shards

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlab import Operator, PodClock, counter, install_operator_identity  # noqa: E402
from benchstats import ratio, summary  # noqa: E402
# The pod template, fake trainer and namespace set-up are the cluster tests' own, so the
# benchmark measures exactly what those tests exercise.
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "cluster")]
from pxj_helpers import create_job_namespace, phoenixjob as test_phoenixjob  # noqa: E402

NS_PREFIX = "bench"
BUCKET = "bench"
GRACE = 5
TRAINER_ENV = {"FAKE_STEPS": "1000000", "FAKE_STEP_SECONDS": "0.05", "FAKE_CKPT_EVERY": "20"}
# With placed checkpoints: resume from them and write none (they stay the newest).
PLACED_ENV = dict(TRAINER_ENV, FAKE_CKPT_UNTIL="0", FAKE_EMERGENCY_SAVE="0")
# The newest checkpoint and the one before it: the operator verifies two (facts.VALID_WANTED).
PLACED_STEPS = (1000, 2000)
GB = 1 << 30
BLOCK = 64 << 20


def job_storage(lab: Lab, name: str) -> S3Storage:
    s3 = lab.s3
    return S3Storage(BUCKET, f"{name}/train", endpoint_url=s3.url, access_key=s3.access_key,
                     secret_key=s3.secret_key)


def place_checkpoints(lab: Lab, names: list[str], gb: float, shards: int, spool: Path) -> dict:
    """Commit ``PLACED_STEPS`` checkpoints of ``gb`` GiB under every job's phase prefix.

    The shards are uploaded once, one at a time (a spool of one shard), into the first job's
    first step with the writer's ``upload_shards`` (sha256, S3 SHA256 checksum, size
    check), and its manifest is published with ``publish_manifest``. Every other (job, step)
    gets the same shards as hard links in the S3 server's posix backend, is checked through
    S3 (a HEAD per shard must report the size and stored checksum the writer recorded), and
    gets its own manifest from ``publish_manifest``."""
    shard_bytes = int(gb * GB) // shards
    # The shards, the spool, a multipart upload being joined, and room left for others.
    need = shard_bytes * (shards + 2) + 2 * GB
    free = shutil.disk_usage(spool).free
    if free < need:
        raise RuntimeError(f"{gb} GiB of checkpoints need about {need / GB:.1f} GiB free under "
                           f"{spool}; {free / GB:.1f} GiB are: pick smaller --checkpoint-gb")
    block = os.urandom(BLOCK)
    first = job_storage(lab, names[0])
    digests: dict = {}
    t0 = time.monotonic()
    for i in range(shards):
        # The disk is shared: stop (and clean up) rather than fill it if others took space.
        if shutil.disk_usage(spool).free < 2 * shard_bytes + GB:
            raise RuntimeError(f"disk nearly full under {spool} while placing {gb} GiB; stopped")
        path = spool / f"shard-{i:02d}.bin"
        with open(path, "wb") as f:
            f.write(i.to_bytes(8, "big"))  # shards differ
            left = shard_bytes - 8
            while left > 0:
                f.write(block[:min(left, BLOCK)])
                left -= BLOCK
        try:
            digests.update(upload_shards(first, PLACED_STEPS[0], {path.name: path}))
        finally:
            path.unlink()
    publish_manifest(first, PLACED_STEPS[0], digests, epoch=0, phase="train",
                     config_fingerprint="fake")
    upload_seconds = time.monotonic() - t0
    data = lab.s3_server.data_dir / BUCKET
    source = data / names[0] / "train" / step_dir_name(PLACED_STEPS[0])
    for name in names:
        storage = job_storage(lab, name)
        for step in PLACED_STEPS:
            if (name, step) == (names[0], PLACED_STEPS[0]):
                continue
            d = step_dir_name(step)
            (data / name / "train" / d).mkdir(parents=True, exist_ok=True)
            for shard, entry in digests.items():
                os.link(source / shard, data / name / "train" / d / shard)
                size, stored = storage.stat(f"{d}/{shard}")
                if (size, stored) != (entry.size, entry.stored_checksum):
                    raise RuntimeError(f"{storage.uri_for(d)}/{shard}: the store reports "
                                       f"{size} bytes, checksum {stored}; expected {entry}")
            publish_manifest(storage, step, digests, epoch=0, phase="train",
                             config_fingerprint="fake")
    # What the operator's verification costs from here (it does the same per recovery).
    storage = job_storage(lab, names[-1])
    verify = []
    for _ in range(3):
        t1 = time.monotonic()
        infos = [verify_checkpoint(storage, step, deep=True) for step in reversed(PLACED_STEPS)]
        verify.append(time.monotonic() - t1)
        if not all(i.valid for i in infos):
            raise RuntimeError(f"placed checkpoint invalid: {[i.reason for i in infos]}")
    return {"checkpoint_gb": gb, "shards": shards, "shard_bytes": shard_bytes,
            "checkpoints_per_job": len(PLACED_STEPS), "jobs": len(names),
            "stored_checksums": all(e.stored_checksum for e in digests.values()),
            "upload_seconds": round(upload_seconds, 1),
            "verify_two_checkpoints_seconds_median": round(sorted(verify)[1], 4)}


def last_checkpoint_step(job: dict) -> int | None:
    for phase in (job.get("status") or {}).get("phases") or ():
        return (phase.get("lastCheckpoint") or {}).get("step")
    return None


def remove_checkpoints(lab: Lab, names: list[str]) -> None:
    """Every object under the jobs' prefixes (checkpoints, fences), to free the disk."""
    s3 = lab.s3.client()
    for name in names:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{name}/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})


def measure(lab: Lab, api, ns: str, selectors: list[str], rounds: int,
            label: str) -> list[float]:
    """``rounds`` rounds; in each, the running pod of every job is evicted at once and the
    time to each job's replacement is recorded (jobs in parallel, so a controller's backoff
    is waited out once per round, not once per job)."""
    clocks = [PodClock(api, ns, sel) for sel in selectors]
    for c in clocks:
        c.start()
    latencies = []

    def running(clock):
        return next(iter(sorted(clock.running - set(clock.ended))), None)

    try:
        for r in range(rounds):
            victims = []
            for clock in clocks:
                pod = clock.wait(lambda: running(clock), 600,
                                 f"{label}: a running trainer pod ({clock.selector}, round {r + 1})")
                victims.append((clock, pod, set(clock.order)))
            time.sleep(0.5)  # past start-up, as a real preemption would find it
            for _, pod, _ in victims:
                lab.evict(ns, pod)
            for clock, pod, before in victims:
                clock.wait(lambda: pod in clock.ended, 120, f"{label}: {pod} to end")
                new = clock.wait(lambda: next((p for p in clock.order if p not in before), None),
                                 600, f"{label}: replacement of {pod}")
                latencies.append(clock.added[new] - clock.ended[pod])
                print(f"[{label}] round {r + 1}: {pod} -> {new} in {latencies[-1]:.3f}s",
                      flush=True)
    finally:
        for c in clocks:
            c.stop.set()
    return latencies


def phoenixjob(name: str, image: str, s3_url: str, suspend: bool = False,
               env: dict | None = None) -> dict:
    job = test_phoenixjob(name, BUCKET, s3_url, image=image, env=env or TRAINER_ENV, grace=GRACE,
                          suspend=suspend)
    job["spec"]["checkpoint"]["uri"] = f"s3://{BUCKET}/{name}"  # one bucket, a prefix per job
    return job


def k8s_job(name: str, image: str, s3_url: str) -> dict:
    """The same trainer pod template under a batch/v1 Job: PhoenixJob's env contract by hand."""
    template = test_phoenixjob(name, BUCKET, s3_url, image=image, env=TRAINER_ENV,
                               grace=GRACE)["spec"]["template"]
    container = template["spec"]["containers"][0]
    container["env"] += [
        {"name": "PHOENIX_CHECKPOINT_URI", "value": f"s3://{BUCKET}/{name}/train"},
        {"name": "AWS_ENDPOINT_URL", "value": s3_url},
        {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
    ] + [{"name": k, "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": k}}}
         for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    template["spec"].update(restartPolicy="Never", terminationGracePeriodSeconds=GRACE)
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {
            "backoffLimit": 6,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0, 137, 143]}},
            ]},
            "template": template,
        },
    }


def phoenix_at_size(lab: Lab, api, ns: str, image: str, gb: float, args, spool: Path) -> dict:
    """Part A for Phoenix with checkpoints of ``gb`` GiB (0: the fake trainer's own)."""
    custom = client.CustomObjectsApi(api)
    tag = f"{gb:g}g".replace(".", "p")
    names = [f"rec-{tag}-{k}" for k in range(args.parallel)]
    entry: dict = {"checkpoint_gb": gb}
    try:
        if gb > 0:
            spool.mkdir(exist_ok=True)
            print(f"[phoenix {gb:g} GiB] placing checkpoints", flush=True)
            entry["placed"] = place_checkpoints(lab, names, gb, args.checkpoint_shards, spool)
            print(f"[phoenix {gb:g} GiB] {entry['placed']}", flush=True)
        for name in names:
            custom.create_namespaced_custom_object(
                "phoenix.dev", "v1alpha1", ns, "phoenixjobs",
                phoenixjob(name, image, lab.s3.url, env=PLACED_ENV if gb > 0 else TRAINER_ENV))
        phx = measure(lab, api, ns, [f"phoenix.dev/job={n}" for n in names], args.rounds,
                      f"phoenix {gb:g} GiB")
        entry["phoenix"] = summary(phx)
        # With placed checkpoints this is the newest placed step for every job: nothing wrote
        # newer ones, so every recovery listed and verified the placed ones.
        entry["last_checkpoint_steps"] = [
            last_checkpoint_step(custom.get_namespaced_custom_object(
                "phoenix.dev", "v1alpha1", ns, "phoenixjobs", n)) for n in names]
    finally:
        for name in names:
            try:
                custom.delete_namespaced_custom_object("phoenix.dev", "v1alpha1", ns,
                                                       "phoenixjobs", name)
            except client.ApiException as e:
                if e.status != 404:
                    raise
        if gb > 0:
            remove_checkpoints(lab, names)
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recovery.json"))
    ap.add_argument("--parallel", type=int, default=5, help="jobs of each kind preempted together")
    ap.add_argument("--rounds", type=int, default=4,
                    help="preemption rounds; samples per kind = parallel x rounds")
    ap.add_argument("--checkpoint-gb", type=float, nargs="+", default=[0.0],
                    help="checkpoint sizes (GiB) the Phoenix part runs with, one run each; 0: "
                         "the fake trainer's own tiny checkpoints")
    ap.add_argument("--checkpoint-shards", type=int, default=8,
                    help="shards per placed checkpoint")
    ap.add_argument("--jobs", type=int, default=500, help="PhoenixJobs of part B (0: skip it)")
    ap.add_argument("--resync", type=float, default=10.0,
                    help="operator resync period during the many-jobs part")
    ap.add_argument("--window", type=float, default=30.0,
                    help="seconds over which the steady reconcile rate is measured")
    args = ap.parse_args()

    result: dict = {"preemptions_per_kind": args.parallel * args.rounds,
                    "parallel": args.parallel, "rounds": args.rounds, "jobs": args.jobs,
                    "machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        lab = Lab(Path(tmp) / "lab", ports=LabPorts.ephemeral())
        op = None
        try:
            lab.up()  # inside the try: a lab that failed half-way up is torn down too
            kubeconfig = install_operator_identity(lab)
            op = Operator(kubeconfig, Path(tmp) / "operator.log",
                          env={"PHOENIX_RESYNC_SECONDS": str(args.resync)})
            metrics = op.metrics
            result["operator_rss_mb_idle"] = round(op.rss_mb(), 1)

            with lab.api_client() as api:
                core = client.CoreV1Api(api)
                custom = client.CustomObjectsApi(api)
                ns = create_job_namespace(lab, core, prefix=NS_PREFIX)
                lab.s3.client().create_bucket(Bucket=BUCKET)
                image = lab.trainer_image

                # --- A: time to replacement -------------------------------------------------
                by_size = []
                for gb in args.checkpoint_gb:
                    try:
                        by_size.append(phoenix_at_size(lab, api, ns, image, gb, args,
                                                       Path(tmp) / "spool"))
                    except Exception as e:  # noqa: BLE001 - keep the other sizes' figures
                        print(f"[phoenix {gb:g} GiB] failed: {e!r}", flush=True)
                        by_size.append({"checkpoint_gb": gb, "error": repr(e)[:500]})
                batch = client.BatchV1Api(api)
                jnames = [f"kjob-{k}" for k in range(args.parallel)]
                for name in jnames:
                    batch.create_namespaced_job(ns, k8s_job(name, image, lab.s3.url))
                job = measure(lab, api, ns, [f"batch.kubernetes.io/job-name={n}" for n in jnames],
                              args.rounds, "job")
                for name in jnames:
                    batch.delete_namespaced_job(name, ns, propagation_policy="Background")
                baseline = summary(job)
                for entry in (e for e in by_size if "phoenix" in e):
                    entry["job_over_phoenix"] = {
                        q: ratio(baseline[q], entry["phoenix"][q]) for q in ("p50", "p95")}
                    entry["p50_within_1s"] = entry["phoenix"]["p50"] <= 1.0
                result["time_to_replacement_seconds"] = {"phoenix": by_size[0].get("phoenix"),
                                                         "job_podfailurepolicy": baseline}
                result["by_checkpoint_size"] = by_size
                result["operator_rss_mb_after_recoveries"] = round(op.rss_mb(), 1)

                # --- B: many jobs -------------------------------------------------------------
                if args.jobs > 0:  # 0: skip
                    t0 = time.monotonic()
                    for i in range(args.jobs):
                        custom.create_namespaced_custom_object(
                            "phoenix.dev", "v1alpha1", ns, "phoenixjobs",
                            phoenixjob(f"many-{i:04d}", image, lab.s3.url, suspend=True))
                    created = time.monotonic() - t0

                    def settled() -> int:
                        items = custom.list_namespaced_custom_object(
                            "phoenix.dev", "v1alpha1", ns, "phoenixjobs")["items"]
                        return sum(1 for j in items if j["metadata"]["name"].startswith("many-")
                                   and (j.get("status") or {}).get("phase") == "Suspended")

                    deadline = time.monotonic() + 600
                    while settled() < args.jobs and time.monotonic() < deadline:
                        time.sleep(1)
                    all_settled = time.monotonic() - t0
                    time.sleep(args.resync)  # let the first resync wave pass
                    before, t1 = counter(metrics(), "phoenix_reconciles_total"), time.monotonic()
                    time.sleep(args.window)
                    after, t2 = counter(metrics(), "phoenix_reconciles_total"), time.monotonic()
                    text = metrics()
                    result["many_jobs"] = {
                        "jobs": args.jobs,
                        "settled": settled(),
                        "create_seconds": round(created, 2),
                        "all_status_written_seconds": round(all_settled, 2),
                        "first_reconcile_rate_per_second": round(args.jobs / all_settled, 1),
                        "resync_seconds": args.resync,
                        "steady_reconcile_rate_per_second": round((after - before) / (t2 - t1), 1),
                        "expected_steady_rate_per_second": round(args.jobs / args.resync, 1),
                        "reconcile_seconds_sum": counter(text, "phoenix_reconcile_duration_seconds_sum"),
                        "reconcile_count": counter(text, "phoenix_reconcile_duration_seconds_count"),
                        "operator_rss_mb": round(op.rss_mb(), 1),
                    }
        finally:
            if op is not None:
                op.stop()
            lab.down()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    ttr = result["time_to_replacement_seconds"]
    print(json.dumps({k: {m: (ttr[k] or {}).get(m) for m in ("n", "p50", "p95")} for k in ttr},
                     indent=2))
    print(json.dumps([{k: v for k, v in e.items() if k != "phoenix"}
                      | {"phoenix": {m: e.get("phoenix", {}).get(m) for m in ("n", "p50", "p95")}}
                      for e in result["by_checkpoint_size"]], indent=2))
    if "many_jobs" in result:
        print(json.dumps(result["many_jobs"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
