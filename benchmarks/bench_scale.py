"""The operator at scale: many running PhoenixJobs among many unrelated pods, on simulated nodes.

500 real trainer containers do not fit on two cores, so this runs on the lab's control plane
only (etcd, kube-apiserver, kube-controller-manager, kube-scheduler; ``Lab.up_control_plane``)
and plays the kubelet itself, as a "virtual kubelet" would:

- it registers simulated Nodes (spot nodes with GPUs, labelled and tainted like the lab's, and
  plain nodes for the unrelated pods) and keeps them Ready: their Lease is renewed and their
  Ready condition's heartbeat refreshed every ``HEARTBEAT`` seconds, so the node lifecycle
  controller never taints or evicts them;
- it watches every pod; a pod bound to one of its nodes (by kube-scheduler, or by nodeName)
  is marked Running through the pods/status subresource; a pod being deleted (Eviction API,
  the operator, garbage collection) is finished as a kubelet finishes it: a trainer pod gets
  a terminated container (exit 143 and the trainer's "preempted" termination message), then
  the final delete (grace 0); a pod it is told to crash gets exit 1 and a "failed" message.

The operator runs as a host process with the chart's ServiceAccount (its RSS read from /proc)
and its default settings (resync 60 s). Steps:

1. ``--noise`` unrelated pods (no Phoenix labels) in ``--noise-namespaces`` namespaces, bound
   to the plain nodes and marked Running.
2. ``--jobs`` PhoenixJobs (not suspended): the operator creates their pods, the scheduler
   binds them to the spot nodes, the harness marks them Running. Measured: until every job's
   status is Running and names its pod, and until every pod runs.
3. Steady state for ``--window`` seconds (reconcile rate, RSS).
4. ``--rounds`` rounds of changes: in each, ``--evict`` running trainer pods are evicted and
   ``--crash`` crash (exit 1). For each, the seconds from the change until the job's status
   reflects it (the preemption or failure counted; for an eviction also the replacement pod
   named), against the 10 s bar of issue 12. RSS is sampled every second throughout.

    .venv/bin/python benchmarks/bench_scale.py --out benchmarks/results/scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from phoenix_lab.cluster import Lab, LabPorts
from phoenix_lab.samples import RESTRICTED_CONTAINER
from phoenix_trainer.core.contract import TerminationMessage

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO / "tests"),
                str(REPO / "tests" / "cluster")]
from benchlab import Operator, counter, install_operator_identity  # noqa: E402
from benchstats import summary  # noqa: E402
from pxj_helpers import SPOT_TOLERATION, create_job_namespace, phoenixjob  # noqa: E402

GROUP, VERSION, PLURAL = "phoenix.dev", "v1alpha1", "phoenixjobs"
LABEL_JOB = "phoenix.dev/job"
BUCKET = "scale"
IMAGE = "phoenix-trainer:simulated"  # never pulled: no kubelet runs it
HEARTBEAT = 10.0
SPOT_GPUS = 64
BAR_SECONDS = 10.0
BAR_RSS_MB = 150.0


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def phase_view(status: dict | None) -> dict:
    """What the benchmark reads of a job's status: phase, and the first phase's pod and
    counters (the jobs here have one phase)."""
    status = status or {}
    first = next(iter(status.get("phases") or ()), {})
    return {"phase": status.get("phase"), "pod": first.get("pod"),
            "preemptions": first.get("preemptions") or 0, "failures": first.get("failures") or 0,
            "attempts": first.get("attempts") or 0}


# --- the simulated kubelet --------------------------------------------------------------------
class VirtualKubelet:
    """Simulated nodes kept Ready, and the pods bound to them run and end as a kubelet would
    make them (through the API only: pods/status, delete)."""

    def __init__(self, api: client.ApiClient, spot_nodes: int, plain_nodes: int) -> None:
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.spot = [f"sim-spot-{i}" for i in range(spot_nodes)]
        self.plain = [f"sim-node-{i}" for i in range(plain_nodes)]
        self.nodes = set(self.spot) | set(self.plain)
        self.stop = threading.Event()
        self.work: queue.Queue = queue.Queue()
        self.pool = ThreadPoolExecutor(6, thread_name_prefix="vkubelet")
        self.lock = threading.Lock()
        self.marked: set[str] = set()       # pod uids marked Running
        self.finished: set[str] = set()     # pod uids finished
        self.crash: set[str] = set()        # pod uids to end with exit 1
        self.running_at: dict[str, float] = {}  # pod name -> when marked Running (monotonic)
        self.ended_at: dict[str, float] = {}    # pod name -> when its container ended
        self.errors: list[str] = []
        self.ready: set[str] = set()
        self.cv = threading.Condition(self.lock)

    # nodes
    def register(self) -> None:
        for name in self.nodes:
            spot = name in self.spot
            node = {"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                         **({"phoenix.dev/spot": "true"} if spot else {})}},
                "spec": {"taints": [{"key": t["key"], "value": "true", "effect": t["effect"]}
                                    for t in SPOT_TOLERATION] if spot else []}}
            self.core.create_node(node)
        self.heartbeat()
        threading.Thread(target=self._heartbeats, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()
        for _ in range(6):
            threading.Thread(target=self._worker, daemon=True).start()

    def heartbeat(self) -> None:
        t = now_iso()
        micro = datetime.now(timezone.utc).isoformat()
        for name in self.nodes:
            spot = name in self.spot
            capacity = {"cpu": "1000", "memory": "4000Gi", "pods": "2000",
                        **({"nvidia.com/gpu": str(SPOT_GPUS)} if spot else {})}
            self.core.patch_node_status(name, {"status": {
                "capacity": capacity, "allocatable": capacity,
                "conditions": [dict({"type": "Ready", "status": "True", "reason": "KubeletReady",
                                     "message": "simulated by bench_scale",
                                     "lastHeartbeatTime": t},
                                    **({} if name in self.ready else {"lastTransitionTime": t}))],
                "nodeInfo": {"kubeletVersion": "v1.35.0-sim", "architecture": "amd64",
                             "operatingSystem": "linux"}}}, _preload_content=False)
            lease = {"metadata": {"name": name, "namespace": "kube-node-lease"},
                     "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                              "renewTime": micro}}
            try:
                self.coord.patch_namespaced_lease(name, "kube-node-lease", lease,
                                                  _preload_content=False)
            except ApiException as e:
                if e.status != 404:
                    raise
                self.coord.create_namespaced_lease("kube-node-lease", lease,
                                                   _preload_content=False)
        self.ready = set(self.nodes)

    def _heartbeats(self) -> None:
        while not self.stop.wait(HEARTBEAT):
            try:
                self.heartbeat()
            except Exception as e:  # noqa: BLE001 - report, keep beating
                self.errors.append(f"heartbeat: {e!r}"[:300])

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the node lifecycle controller took its not-ready taints off every node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = [n for n in self.core.list_node().items if n.metadata.name in self.nodes]
            if len(nodes) == len(self.nodes) and not any(
                    t.key.startswith("node.kubernetes.io/") for n in nodes
                    for t in n.spec.taints or ()):
                return
            time.sleep(0.5)
        raise TimeoutError("simulated nodes not Ready/untainted in time")

    # pods
    def _watch(self) -> None:
        rv = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    resp = self.core.list_pod_for_all_namespaces(_preload_content=False)
                    data = json.loads(resp.data)
                    for pod in data.get("items") or ():
                        self._see(pod)
                    rv = data["metadata"]["resourceVersion"]
                resp = self.core.list_pod_for_all_namespaces(
                    watch=True, resource_version=rv, timeout_seconds=120,
                    allow_watch_bookmarks=True, _preload_content=False)
                for line in iter_resp_lines(resp):
                    ev = json.loads(line)
                    obj = ev["object"]
                    if ev["type"] == "ERROR":
                        rv = None if obj.get("code") == 410 else rv
                        break
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        self._see(obj)
            except Exception as e:  # noqa: BLE001 - re-watch after API hiccups
                self.errors.append(f"watch: {e!r}"[:300])
                time.sleep(0.5)

    def _see(self, pod: dict) -> None:
        node = (pod.get("spec") or {}).get("nodeName")
        if node not in self.nodes:
            return
        uid = pod["metadata"]["uid"]
        phase = (pod.get("status") or {}).get("phase")
        with self.lock:
            if pod["metadata"].get("deletionTimestamp") or uid in self.crash:
                if uid in self.finished:
                    return
                self.finished.add(uid)
            elif phase == "Pending" and uid not in self.marked:
                self.marked.add(uid)
            else:
                return
        self.work.put(pod)

    def _worker(self) -> None:
        while not self.stop.is_set():
            try:
                pod = self.work.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._act(pod)
            except ApiException as e:
                if e.status not in (404, 409):
                    self._retry(pod, f"{e.status} {e.reason}")
            except Exception as e:  # noqa: BLE001 - a dropped connection: try again
                self._retry(pod, repr(e))

    def _retry(self, pod: dict, why: str) -> None:
        tries = pod.setdefault("_tries", 0) + 1
        pod["_tries"] = tries
        if tries >= 3:
            self.errors.append(f"{pod['metadata']['name']}: {why}"[:300])
            return
        time.sleep(0.2 * tries)
        self.work.put(pod)

    def _act(self, pod: dict) -> None:
        meta = pod["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        trainer = LABEL_JOB in (meta.get("labels") or {})
        container = pod["spec"]["containers"][0]["name"]
        t = now_iso()
        if meta.get("deletionTimestamp") or uid in self.crash:
            crash = uid in self.crash and not meta.get("deletionTimestamp")
            if trainer:
                tm = (TerminationMessage("failed", step=100, message="simulated crash")
                      if crash else
                      TerminationMessage("preempted", step=100, message="SIGTERM at step 100"))
                self.core.patch_namespaced_pod_status(name, ns, {"status": {
                    "phase": "Failed",
                    "containerStatuses": [{
                        "name": container, "image": container_image(pod), "imageID": "",
                        "ready": False, "restartCount": 0, "started": False,
                        "containerID": f"sim://{uid}",
                        "state": {"terminated": {
                            "exitCode": 1 if crash else 143, "reason": "Error",
                            "message": tm.to_json(), "startedAt": t, "finishedAt": t,
                            "containerID": f"sim://{uid}"}}}]}}, _preload_content=False)
                with self.cv:
                    self.ended_at[name] = time.monotonic()
                    self.cv.notify_all()
            if crash:
                return  # a crashed pod stays, Failed, until its owner deletes it
            self.core.delete_namespaced_pod(
                name, ns, body=client.V1DeleteOptions(grace_period_seconds=0,
                                                      preconditions=client.V1Preconditions(uid=uid)),
                _preload_content=False)
            return
        self.core.patch_namespaced_pod_status(name, ns, {"status": {
            "phase": "Running", "startTime": t,
            "conditions": [{"type": c, "status": "True", "lastTransitionTime": t}
                           for c in ("PodReadyToStartContainers", "Initialized", "ContainersReady",
                                     "Ready")],
            "containerStatuses": [{
                "name": container, "image": container_image(pod), "imageID": "", "ready": True,
                "restartCount": 0, "started": True, "containerID": f"sim://{uid}",
                "state": {"running": {"startedAt": t}}}]}}, _preload_content=False)
        with self.cv:
            self.running_at[name] = time.monotonic()
            self.cv.notify_all()

    def crash_pod(self, pod: dict) -> None:
        with self.lock:
            self.crash.add(pod["metadata"]["uid"])
            self.finished.add(pod["metadata"]["uid"])
        self.work.put(pod)

    def running_count(self, names: set[str]) -> int:
        with self.lock:
            return len(names & self.running_at.keys())


def container_image(pod: dict) -> str:
    return pod["spec"]["containers"][0].get("image") or IMAGE


# --- job statuses -----------------------------------------------------------------------------
class JobWatch:
    """The newest status of every PhoenixJob in a namespace (a watch), and waiters on it:
    ``expect(job, predicate)`` returns a slot filled with the monotonic time at which the job's
    status first satisfied the predicate."""

    def __init__(self, api: client.ApiClient, ns: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.ns = ns
        self.views: dict[str, dict] = {}
        self.waiting: dict[str, list] = {}
        self.cv = threading.Condition()
        self.stop = threading.Event()
        self.errors: list[str] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        rv = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    data = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL)
                    for job in data.get("items") or ():
                        self._see(job)
                    rv = data["metadata"]["resourceVersion"]
                resp = self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, self.ns, PLURAL, watch=True, resource_version=rv,
                    timeout_seconds=120, _preload_content=False)
                for line in iter_resp_lines(resp):
                    ev = json.loads(line)
                    if ev["type"] == "ERROR":
                        rv = None if ev["object"].get("code") == 410 else rv
                        break
                    rv = ev["object"]["metadata"].get("resourceVersion", rv)
                    if ev["type"] != "DELETED":
                        self._see(ev["object"])
            except Exception as e:  # noqa: BLE001
                self.errors.append(repr(e)[:300])
                time.sleep(0.5)

    def _see(self, job: dict) -> None:
        t = time.monotonic()
        name = job["metadata"]["name"]
        view = phase_view(job.get("status"))
        with self.cv:
            self.views[name] = view
            keep = []
            for slot, pred in self.waiting.get(name, ()):
                if pred(view):
                    slot["at"] = t
                else:
                    keep.append((slot, pred))
            self.waiting[name] = keep
            self.cv.notify_all()

    def expect(self, name: str, pred) -> dict:
        slot: dict = {"at": None}
        with self.cv:
            if name in self.views and pred(self.views[name]):
                slot["at"] = time.monotonic()
            else:
                self.waiting.setdefault(name, []).append((slot, pred))
        return slot

    def view(self, name: str) -> dict:
        with self.cv:
            return dict(self.views.get(name) or phase_view(None))

    def wait(self, slots: list[dict], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cv:
            while any(s["at"] is None for s in slots) and time.monotonic() < deadline:
                self.cv.wait(0.5)


class RssSampler(threading.Thread):
    def __init__(self, op: Operator) -> None:
        super().__init__(daemon=True)
        self.op = op
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.samples.append((time.monotonic(), self.op.rss_mb()))

    def peak(self, since: float = 0.0) -> float:
        return round(max((r for t, r in self.samples if t >= since), default=0.0), 1)


def start_replicas(kubeconfig: str, tmp: Path, env: dict[str, str],
                   replicas: int) -> tuple[Operator, list[Operator]]:
    """The operator, or (``replicas`` > 1) that many electing on the chart's Lease with the
    chart's timings: the first leads (waited for), the others stand by."""
    if replicas == 1:
        return Operator(kubeconfig, tmp / "operator-0.log", env=env), []
    election = {"PHOENIX_LEADER_ELECTION": "true", "PHOENIX_LEASE_NAME": "phx-operator",
                "PHOENIX_LEASE_NAMESPACE": "phoenix-system"}
    ops = []
    for i in range(replicas):
        ops.append(Operator(kubeconfig, tmp / f"operator-{i}.log",
                            env=dict(env, **election, PHOENIX_POD_NAME=f"op-{i}")))
        if i == 0:
            deadline = time.monotonic() + 30
            while "phoenix_operator_leader 1.0" not in ops[0].metrics().splitlines():
                if time.monotonic() > deadline:
                    raise RuntimeError("the first operator replica did not lead in 30 s")
                time.sleep(0.2)
    return ops[0], ops[1:]


# --- the run ----------------------------------------------------------------------------------
def noise_pod(i: int, node: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"noise-{i:05d}", "labels": {"app": "unrelated"}},
            "spec": {"nodeName": node, "restartPolicy": "Always",
                     "containers": [{"name": "app", "image": "unrelated-app:1",
                                     "securityContext": RESTRICTED_CONTAINER}]}}


def parallel(fn, items, workers: int = 8) -> None:
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, items):
            pass


def rounds_of_changes(args, core, kubelet: VirtualKubelet, jobs: JobWatch, ns: str,
                      names: list[str], rng: random.Random) -> dict:
    counted, replaced, crash_counted = [], [], []
    late: list[dict] = []
    crashed: set[str] = set()  # in backoff after their failure: left alone afterwards
    for r in range(args.rounds):
        with kubelet.lock:
            live = [n for n in names if n not in crashed
                    and (pod := jobs.view(n)["pod"]) in kubelet.running_at
                    and pod not in kubelet.ended_at]
        victims = rng.sample(live, min(len(live), args.evict + args.crash))
        crashed.update(victims[args.evict:])
        slots = []
        pods = {name: core.read_namespaced_pod(jobs.view(name)["pod"], ns, _preload_content=False)
                for name in victims[args.evict:]}
        for k, name in enumerate(victims):
            view = jobs.view(name)
            old_pod, crash = view["pod"], k >= args.evict
            key = "failures" if crash else "preemptions"
            before = view[key]
            c = jobs.expect(name, lambda v, key=key, before=before: v[key] > before)
            rep = None if crash else jobs.expect(
                name, lambda v, old=old_pod: v["pod"] not in (None, old))
            t0 = time.monotonic()
            if crash:
                kubelet.crash_pod(json.loads(pods[name].data))
            else:
                core.create_namespaced_pod_eviction(old_pod, ns, client.V1Eviction(
                    metadata=client.V1ObjectMeta(name=old_pod, namespace=ns)),
                    _preload_content=False)
            slots.append((name, crash, t0, c, rep))
        jobs.wait([s for _, _, _, c, rep in slots for s in (c, rep) if s is not None],
                  args.timeout)
        for name, crash, t0, c, rep in slots:
            if c["at"] is None or (rep is not None and rep["at"] is None):
                late.append({"round": r + 1, "job": name, "crash": crash, "view": jobs.view(name)})
                continue
            (crash_counted if crash else counted).append(c["at"] - t0)
            if rep is not None:
                replaced.append(rep["at"] - t0)
        print(f"[scale] round {r + 1}: {len(slots)} changes; late/missing {len(late)}", flush=True)
        time.sleep(args.pause)
    return {"eviction_counted": summary(counted), "eviction_replacement_named": summary(replaced),
            "crash_counted": summary(crash_counted), "not_reflected_within_timeout": late,
            "changes": args.rounds * (args.evict + args.crash)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--noise", type=int, default=5000, help="unrelated pods")
    ap.add_argument("--noise-namespaces", type=int, default=10)
    ap.add_argument("--spot-nodes", type=int, default=10, help=f"{SPOT_GPUS} GPUs each")
    ap.add_argument("--plain-nodes", type=int, default=3)
    ap.add_argument("--window", type=float, default=60.0, help="steady-state seconds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--evict", type=int, default=40, help="pods evicted per round")
    ap.add_argument("--crash", type=int, default=10, help="pods crashed (exit 1) per round")
    ap.add_argument("--pause", type=float, default=15.0, help="seconds between rounds")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="give up waiting for a change to show after this long")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replicas", type=int, default=1,
                    help="operator replicas; > 1 elects a leader on a Lease as the chart does "
                         "(the figures are the leader's; the standbys' RSS beside them)")
    ap.add_argument("--operator-env", nargs="*", default=[],
                    help="extra KEY=VALUE for the operator (default: its own defaults)")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    result: dict = {"benchmark": "scale", "args": vars(args), "machine": {"cpus": os.cpu_count()},
                    "bars": {"rss_mb": BAR_RSS_MB, "status_current_seconds": BAR_SECONDS}}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        lab = Lab(Path(tmp) / "lab", ports=LabPorts.ephemeral())
        op = kubelet = jobs = sampler = None
        standbys: list[Operator] = []
        try:
            lab.up_control_plane()
            kubeconfig = install_operator_identity(lab)
            with lab.api_client() as api:
                api.configuration.connection_pool_maxsize = 32
                api.rest_client.pool_manager.connection_pool_kw["maxsize"] = 32
                core = client.CoreV1Api(api)
                custom = client.CustomObjectsApi(api)
                kubelet = VirtualKubelet(api, args.spot_nodes, args.plain_nodes)
                kubelet.register()
                kubelet.wait_ready()
                ns = create_job_namespace(lab, core, prefix="scale")
                lab.s3.client().create_bucket(Bucket=BUCKET)

                env = dict(kv.split("=", 1) for kv in args.operator_env)
                op, standbys = start_replicas(kubeconfig, Path(tmp), env, args.replicas)
                sampler = RssSampler(op)
                sampler.start()
                time.sleep(3)
                result["rss_mb"] = {"idle": round(op.rss_mb(), 1)}
                standby_rss = result["rss_mb_standby"] = {}

                def standby_sample(key: str) -> None:
                    if standbys:
                        standby_rss[key] = round(max(s.rss_mb() for s in standbys), 1)

                standby_sample("idle")

                # 1. unrelated pods
                t0 = time.monotonic()
                noise_ns = [f"unrelated-{k}" for k in range(args.noise_namespaces)]
                for n in noise_ns:
                    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=n)))

                def make_noise(i: int) -> None:
                    core.create_namespaced_pod(noise_ns[i % len(noise_ns)],
                                               noise_pod(i, kubelet.plain[i % len(kubelet.plain)]),
                                               _preload_content=False)

                parallel(make_noise, range(args.noise))
                created = time.monotonic() - t0
                noise_names = {f"noise-{i:05d}" for i in range(args.noise)}
                deadline = time.monotonic() + 600
                while kubelet.running_count(noise_names) < args.noise and time.monotonic() < deadline:
                    time.sleep(1)
                result["unrelated_pods"] = {
                    "pods": args.noise, "namespaces": args.noise_namespaces,
                    "create_seconds": round(created, 1),
                    "all_running_seconds": round(time.monotonic() - t0, 1),
                    "running": kubelet.running_count(noise_names)}
                time.sleep(5)
                result["rss_mb"]["with_unrelated_pods"] = round(op.rss_mb(), 1)
                standby_sample("with_unrelated_pods")
                print(f"[scale] unrelated pods: {result['unrelated_pods']}", flush=True)

                # 2. the jobs
                jobs = JobWatch(api, ns)
                names = [f"job-{i:04d}" for i in range(args.jobs)]
                slots = {n: jobs.expect(n, lambda v: v["phase"] == "Running" and v["pod"])
                         for n in names}
                t0 = time.monotonic()
                created_at: dict[str, float] = {}

                def make_job(name: str) -> None:
                    body = phoenixjob(name, BUCKET, lab.s3.url, image=IMAGE, grace=5)
                    body["spec"]["checkpoint"]["uri"] = f"s3://{BUCKET}/{name}"
                    created_at[name] = time.monotonic()
                    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

                parallel(make_job, names)
                create_seconds = time.monotonic() - t0
                jobs.wait(list(slots.values()), 600)
                all_status = max((s["at"] or float("inf")) for s in slots.values()) - t0
                pod_names = {jobs.view(n)["pod"] for n in names} - {None}
                deadline = time.monotonic() + 300
                while kubelet.running_count(pod_names) < len(pod_names) \
                        and time.monotonic() < deadline:
                    time.sleep(0.5)
                all_pods = time.monotonic() - t0
                result["jobs"] = {
                    "jobs": args.jobs, "create_seconds": round(create_seconds, 1),
                    "all_status_running_seconds": round(all_status, 1),
                    "all_pods_running_seconds": round(all_pods, 1),
                    "status_running": sum(1 for s in slots.values() if s["at"] is not None),
                    "pods_running": kubelet.running_count(pod_names),
                    "created_to_status_running": summary(
                        [s["at"] - created_at[n] for n, s in slots.items() if s["at"]],
                        samples=False)}
                print(f"[scale] jobs: {result['jobs']}", flush=True)
                result["rss_mb"]["with_jobs"] = round(op.rss_mb(), 1)
                standby_sample("with_jobs")

                # 3. steady state
                before, t1 = counter(op.metrics(), "phoenix_reconciles_total"), time.monotonic()
                time.sleep(args.window)
                after, t2 = counter(op.metrics(), "phoenix_reconciles_total"), time.monotonic()
                result["steady"] = {"seconds": round(t2 - t1, 1),
                                    "reconciles_per_second": round((after - before) / (t2 - t1), 2)}
                result["rss_mb"]["steady"] = round(op.rss_mb(), 1)
                standby_sample("steady")

                # 4. changes
                t3 = time.monotonic()
                result["status_current"] = rounds_of_changes(args, core, kubelet, jobs, ns, names,
                                                             rng)
                result["rss_mb"]["after_changes"] = round(op.rss_mb(), 1)
                standby_sample("after_changes")
                if standbys:
                    result["standby"] = {"reconciles": counter(standbys[0].metrics(),
                                                               "phoenix_reconciles_total"),
                                         "cpu_seconds": cpu_seconds(standbys[0].pid)}
                result["rss_mb"]["peak_during_changes"] = sampler.peak(t3)
                result["rss_mb"]["peak"] = sampler.peak()
                text = op.metrics()
                result["operator"] = {
                    "reconciles": counter(text, "phoenix_reconciles_total"),
                    "reconcile_seconds_sum": round(counter(
                        text, "phoenix_reconcile_duration_seconds_sum"), 1),
                    "cpu_seconds": cpu_seconds(op.pid)}
                sc = result["status_current"]
                worst = max((sc[k]["max"] or 0) for k in
                            ("eviction_counted", "eviction_replacement_named", "crash_counted"))
                result["verdict"] = {
                    "rss_within_bar": result["rss_mb"]["peak"] <= BAR_RSS_MB,
                    "statuses_within_bar": worst <= BAR_SECONDS
                    and not sc["not_reflected_within_timeout"],
                    "worst_status_seconds": round(worst, 2)}
                result["harness_errors"] = (kubelet.errors + jobs.errors)[:20]
        finally:
            for part in (sampler, kubelet, jobs):
                if part is not None:
                    part.stop.set()
            for standby in standbys:
                standby.stop()
            if op is not None:
                op.stop()
                result["operator_log_tail"] = tail(Path(tmp) / "operator-0.log")
            lab.down()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("operator_log_tail", "args")},
                     indent=2))
    print(f"wrote {out}")
    return 0


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)
    except (OSError, IndexError, ValueError):
        return None


def tail(path: Path, n: int = 30) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


if __name__ == "__main__":
    sys.exit(main())
