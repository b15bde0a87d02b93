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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml
from kubernetes import client, watch

from phoenix_lab.cluster import Lab, LabPorts
from phoenix_lab.procs import free_port

REPO = Path(__file__).resolve().parents[1]
# The pod template, fake trainer and namespace set-up are the cluster tests' own, so the
# benchmark measures exactly what those tests exercise.
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "cluster")]
from pxj_helpers import create_job_namespace, phoenixjob as test_phoenixjob  # noqa: E402

NS_PREFIX = "bench"
BUCKET = "bench"
GRACE = 5
TRAINER_ENV = {"FAKE_STEPS": "1000000", "FAKE_STEP_SECONDS": "0.05", "FAKE_CKPT_EVERY": "20"}


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": percentile(values, 0.5), "p95": percentile(values, 0.95),
            "mean": statistics.fmean(values) if values else None,
            "min": min(values) if values else None, "max": max(values) if values else None,
            "samples": [round(v, 4) for v in values]}


class PodClock(threading.Thread):
    """Watches pods matching a selector; remembers when each was first seen and when it was
    first seen terminal or deleted."""

    def __init__(self, api: client.ApiClient, ns: str, selector: str) -> None:
        super().__init__(daemon=True)
        self.core = client.CoreV1Api(api)
        self.ns = ns
        self.selector = selector
        self.added: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.running: set[str] = set()
        self.order: list[str] = []
        self.stop = threading.Event()
        self.cv = threading.Condition()

    def run(self) -> None:
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(self.core.list_namespaced_pod, self.ns,
                                   label_selector=self.selector, timeout_seconds=30):
                    now = time.monotonic()
                    pod = ev["object"]
                    name = pod.metadata.name
                    with self.cv:
                        if name not in self.added:
                            self.added[name] = now
                            self.order.append(name)
                        if pod.status.phase == "Running" and not pod.metadata.deletion_timestamp:
                            self.running.add(name)
                        if (ev["type"] == "DELETED" or pod.status.phase in ("Failed", "Succeeded")) \
                                and name not in self.ended:
                            self.ended[name] = now
                            self.running.discard(name)
                        self.cv.notify_all()
                    if self.stop.is_set():
                        break
            except Exception:  # noqa: BLE001 - re-watch after API hiccups
                time.sleep(0.2)

    def wait(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                value = pred()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
                self.cv.wait(min(left, 0.5))


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


def phoenixjob(name: str, image: str, s3_url: str, suspend: bool = False) -> dict:
    job = test_phoenixjob(name, BUCKET, s3_url, image=image, env=TRAINER_ENV, grace=GRACE,
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


def rss_mb(pid: int) -> float:
    total = 0
    for p in [pid] + children(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def counter(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recovery.json"))
    ap.add_argument("--parallel", type=int, default=5, help="jobs of each kind preempted together")
    ap.add_argument("--rounds", type=int, default=4,
                    help="preemption rounds; samples per kind = parallel x rounds")
    ap.add_argument("--jobs", type=int, default=500)
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
            lab.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "phoenixjobs.yaml"))
            lab.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        "crd/phoenixjobs.phoenix.dev")
            lab.kubectl("create", "namespace", "phoenix-system")
            rendered = lab.helm("template", "phx", str(REPO / "charts" / "phoenix"), "-n",
                                "phoenix-system", "--skip-crds").stdout
            docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in (
                "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
            lab.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
            sa = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
            kubeconfig = lab.serviceaccount_kubeconfig("phoenix-system", sa)
            metrics_port, health_port = free_port(), free_port()
            log = open(Path(tmp) / "operator.log", "wb")
            op = subprocess.Popen(
                [sys.executable, "-m", "kopf", "run", "-m", "phoenix_operator.main", "--standalone",
                 "--all-namespaces", "--quiet", f"--liveness=http://127.0.0.1:{health_port}/healthz"],
                env=dict(os.environ, KUBECONFIG=kubeconfig, PHOENIX_METRICS_HOST="127.0.0.1",
                         PHOENIX_METRICS_PORT=str(metrics_port),
                         PHOENIX_RESYNC_SECONDS=str(args.resync)),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

            def metrics() -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                    return r.read().decode()

            deadline = time.monotonic() + 60
            while True:
                try:
                    metrics()
                    break
                except OSError:
                    if time.monotonic() > deadline or op.poll() is not None:
                        raise RuntimeError("operator did not start; see operator.log")
                    time.sleep(0.3)
            result["operator_rss_mb_idle"] = round(rss_mb(op.pid), 1)

            with lab.api_client() as api:
                core = client.CoreV1Api(api)
                custom = client.CustomObjectsApi(api)
                ns = create_job_namespace(lab, core, prefix=NS_PREFIX)
                lab.s3.client().create_bucket(Bucket=BUCKET)
                image = lab.trainer_image

                # --- A: time to replacement -------------------------------------------------
                names = [f"rec-{k}" for k in range(args.parallel)]
                for name in names:
                    custom.create_namespaced_custom_object("phoenix.dev", "v1alpha1", ns,
                                                           "phoenixjobs",
                                                           phoenixjob(name, image, lab.s3.url))
                phx = measure(lab, api, ns, [f"phoenix.dev/job={n}" for n in names], args.rounds,
                              "phoenix")
                for name in names:
                    custom.delete_namespaced_custom_object("phoenix.dev", "v1alpha1", ns,
                                                           "phoenixjobs", name)
                batch = client.BatchV1Api(api)
                jnames = [f"kjob-{k}" for k in range(args.parallel)]
                for name in jnames:
                    batch.create_namespaced_job(ns, k8s_job(name, image, lab.s3.url))
                job = measure(lab, api, ns, [f"batch.kubernetes.io/job-name={n}" for n in jnames],
                              args.rounds, "job")
                for name in jnames:
                    batch.delete_namespaced_job(name, ns, propagation_policy="Background")
                result["time_to_replacement_seconds"] = {"phoenix": summary(phx),
                                                         "job_podfailurepolicy": summary(job)}
                result["operator_rss_mb_after_recoveries"] = round(rss_mb(op.pid), 1)

                # --- B: many jobs -------------------------------------------------------------
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
                    "operator_rss_mb": round(rss_mb(op.pid), 1),
                }
        finally:
            if op is not None and op.poll() is None:
                op.terminate()
                try:
                    op.wait(15)
                except subprocess.TimeoutExpired:
                    op.kill()
            lab.down()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    ttr = result["time_to_replacement_seconds"]
    print(json.dumps({k: {m: ttr[k][m] for m in ("n", "p50", "p95")} for k in ttr}, indent=2))
    print(json.dumps({k: v for k, v in result["many_jobs"].items()}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
