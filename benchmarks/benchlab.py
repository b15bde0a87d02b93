"""What the lab benchmarks share: the operator as a host process authenticated as the chart's
ServiceAccount (so its RSS can be read from /proc), its metrics, reading /proc, a watch that
times each pod's creation, binding and start, and the batch/v1 Job baseline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml
from kubernetes import client, watch

from phoenix_lab import samples
from phoenix_lab.cluster import Lab
from phoenix_lab.procs import free_port

REPO = Path(__file__).resolve().parents[1]


def install_operator_identity(lab: Lab) -> str:
    """The CRD, the phoenix-system namespace and the chart's ServiceAccount and RBAC; returns
    a kubeconfig that authenticates as that ServiceAccount."""
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
    return lab.serviceaccount_kubeconfig("phoenix-system", sa)


def install_with_namespace(lab: Lab, namespace: str, bucket: str) -> None:
    """The chart installed as users install it, a namespace for the benchmark's jobs with the
    S3 credentials Secret, and its bucket."""
    from phoenix_lab.install import install_phoenix

    install_phoenix(lab)
    lab.kubectl("create", "namespace", namespace)
    lab.kubectl("apply", "-f", "-", input=json.dumps(samples.credentials_secret(namespace, lab.s3)))
    lab.s3_server.ensure_bucket(bucket)


def operator_env(env: dict[str, str]) -> dict[str, str]:
    """The operator process's environment: with PHOENIX_BENCH_OPERATOR_TREE set (benchmarks/ab.py
    --operator-only), its code comes from that tree of the repository instead of this one."""
    tree = env.get("PHOENIX_BENCH_OPERATOR_TREE")
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.join(tree, "operator"), os.path.join(tree, "trainer_image")])
    return env


class Operator:
    """``kopf run -m phoenix_operator.main --all-namespaces`` as a host process."""

    def __init__(self, kubeconfig: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "-m", "phoenix_operator.main", "--standalone",
             "--all-namespaces", "--quiet",
             f"--liveness=http://127.0.0.1:{self.health_port}/healthz"],
            env=operator_env(dict(os.environ, KUBECONFIG=kubeconfig,
                                  PHOENIX_METRICS_HOST="127.0.0.1",
                                  PHOENIX_METRICS_PORT=str(self.metrics_port), **(env or {}))),
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.metrics()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"operator did not start; see {log_path}")
                time.sleep(0.3)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            return r.read().decode()

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its direct children, MB."""
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
    """Sum of a Prometheus metric's samples (all label sets) in an exposition text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class PodTimeline(threading.Thread):
    """When each pod of a namespace was first seen created, bound to a node and running
    (wall clock, from a watch): where a start's seconds go."""

    def __init__(self, api, namespace: str) -> None:
        super().__init__(daemon=True, name="pod-timeline")
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.seen: dict[str, dict[str, float]] = {}
        self._watch = watch.Watch()
        self._stopped = False

    def run(self) -> None:
        while not self._stopped:
            try:
                for ev in self._watch.stream(self.core.list_namespaced_pod, self.namespace,
                                             timeout_seconds=300):
                    pod, now = ev["object"], time.time()
                    marks = self.seen.setdefault(pod.metadata.name, {})
                    marks.setdefault("created", now)
                    if pod.spec.node_name:
                        marks.setdefault("scheduled", now)
                    if pod.status.phase == "Running":
                        marks.setdefault("running", now)
            except Exception:  # noqa: BLE001 - a dropped watch: start another
                time.sleep(0.5)

    def stop(self) -> None:
        """End the watch (a daemon thread still streaming at interpreter exit can abort it)."""
        self._stopped = True
        self._watch.stop()

    def first_start(self, pod: str, created: float, training: float) -> dict[str, float]:
        """Seconds from the job's creation to each mark of its first pod, and to training."""
        marks = self.seen.get(pod, {})
        out = {k: round(marks[k] - created, 2) for k in ("created", "scheduled", "running")
               if k in marks}
        out["training"] = round(training - created, 2)
        return out


class LabBench:
    """What a benchmark that runs jobs on the lab holds: the lab, the jobs' config, a run id,
    API clients and the timeline of the pods of ``namespace`` (watching from the start)."""

    def __init__(self, lab: Lab, cfg: samples.TrainConfig, run: str, namespace: str) -> None:
        self.lab, self.cfg, self.run, self.namespace = lab, cfg, run, namespace
        self.api = lab.api_client()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.timeline = PodTimeline(self.api, namespace)
        self.timeline.start()


class WatchClock(threading.Thread):
    """A watch, restarted after API hiccups until ``stop`` is set, that hands each event and
    the monotonic time it arrived to ``record`` (under ``cv``, which it then notifies);
    ``wait`` blocks on ``cv`` until a predicate holds."""

    def __init__(self, list_fn: Callable[..., Any], *args: Any, name: str = "watch-clock",
                 **kwargs: Any) -> None:
        super().__init__(daemon=True, name=name)
        self.list_fn, self.args, self.kwargs = list_fn, args, kwargs
        self.stop = threading.Event()
        self.cv = threading.Condition()

    def record(self, event: dict, now: float) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(self.list_fn, *self.args, timeout_seconds=30, **self.kwargs):
                    now = time.monotonic()
                    with self.cv:
                        self.record(ev, now)
                        self.cv.notify_all()
                    if self.stop.is_set():
                        break
            except Exception:  # noqa: BLE001 - re-watch after API hiccups
                time.sleep(0.2)

    def wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self.cv:
            while not (value := pred()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
                self.cv.wait(min(left, 0.5))
            return value


class PodClock(WatchClock):
    """Watches pods matching a selector; remembers when each was first seen and when it was
    first seen terminal or deleted."""

    def __init__(self, api: client.ApiClient, ns: str, selector: str) -> None:
        super().__init__(client.CoreV1Api(api).list_namespaced_pod, ns, name="pod-clock",
                         label_selector=selector)
        self.ns = ns
        self.selector = selector
        self.added: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.running: set[str] = set()
        self.order: list[str] = []

    def record(self, event: dict, now: float) -> None:
        pod = event["object"]
        name = pod.metadata.name
        if name not in self.added:
            self.added[name] = now
            self.order.append(name)
        if pod.status.phase == "Running" and not pod.metadata.deletion_timestamp:
            self.running.add(name)
        if (event["type"] == "DELETED" or pod.status.phase in ("Failed", "Succeeded")) \
                and name not in self.ended:
            self.ended[name] = now
            self.running.discard(name)


def trainer_job(name: str, namespace: str, args: list[str], checkpoint_uri: str, s3_url: str,
                image: str, *, grace: int, checkpoint_every: int, labels: dict[str, str]) -> dict:
    """A batch/v1 Job running the trainer image with ``args``: the trainer finds its newest
    checkpoint under ``checkpoint_uri`` by itself whenever the Job controller restarts the
    pod (the baseline Phoenix is measured against)."""
    env = [{"name": "PHOENIX_CHECKPOINT_URI", "value": checkpoint_uri},
           {"name": "PHOENIX_CHECKPOINT_INTERVAL_STEPS", "value": str(checkpoint_every)},
           {"name": "PHOENIX_GRACE_SECONDS", "value": str(grace)},
           {"name": "PHOENIX_PHASE", "value": "train"},
           {"name": "AWS_ENDPOINT_URL", "value": s3_url}] + [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": samples.CREDENTIALS_SECRET, "key": k}}}
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "backoffLimit": 3,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                      "values": [1]}},
            ]},
            "template": {"metadata": {"labels": labels},
                         "spec": {**samples.trainer_pod_spec(image, args, env),
                                  "restartPolicy": "Never",
                                  "terminationGracePeriodSeconds": grace}},
        },
    }


def dump_diagnostics(lab: Lab, namespace: str, out: Path) -> Path:
    """What explains a surprising figure after the lab is gone: the installed operator's log,
    the namespace's events, pods (with nodes) and PhoenixJobs, and the nodes; one file each."""
    out.mkdir(parents=True, exist_ok=True)
    deployments = lab.kubectl("-n", "phoenix-system", "get", "deployments", "-o", "name",
                              check=False).stdout.split()
    dumps = {f"operator-{d.rsplit('/', 1)[-1]}.log": ("-n", "phoenix-system", "logs", d, "--tail=-1")
             for d in deployments}
    dumps.update({
        "events.txt": ("-n", namespace, "get", "events", "-o", "wide", "--sort-by=.lastTimestamp"),
        "pods.txt": ("-n", namespace, "get", "pods", "-o", "wide"),
        "phoenixjobs.yaml": ("-n", namespace, "get", "phoenixjobs", "-o", "yaml"),
        "nodes.txt": ("get", "nodes", "-o", "wide", "--show-labels"),
    })
    for name, args in dumps.items():
        r = lab.kubectl(*args, check=False)
        (out / name).write_text(r.stdout + r.stderr)
    return out


def keep_failure(result: dict[str, Any], error: BaseException, lab: Lab, namespace: str,
                 state: Path) -> None:
    """A lab benchmark that failed: its error and the lab's state (pods, events, logs) in the
    result, beside what was measured before it."""
    result["error"] = f"{type(error).__name__}: {error}"
    result["diagnostics"] = str(dump_diagnostics(lab, namespace, state / "diagnostics"))


def write_result(result: dict[str, Any], out: Path, started: float) -> None:
    """The result's wall time (from ``started``, a monotonic time), as JSON at ``out``."""
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")


def poll(what: str, check: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    """``check()``'s first truthy answer, asked every ``every`` seconds; TimeoutError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(f"{what} not within {timeout:g}s")
