"""The lab's node agent: a small kubelet (and scheduler) that runs pods as local processes.

It registers a few Node objects (an on-demand node and GPU spot nodes), binds pending pods
to them (nodeSelector, required node affinity, taints/tolerations, `nvidia.com/gpu`
capacity), runs each container's command as a process with the pod's environment, and
reports pod and container status the way a kubelet does: phase, container states, exit
codes (128+signal when killed), reasons and the termination message. Graceful deletion
(and therefore the Eviction API) gets SIGTERM, the grace period, then SIGKILL.

Node loss: when one of its Node objects is deleted, the agent SIGKILLs everything that ran
there without reporting (a dead node reports nothing), then registers a fresh spot node,
as a cloud's node group would. Pod GC in the controller-manager cleans up the orphans.

What it does not do: images (the command runs on the host, `python` is the project's
venv), volumes, probes, init containers, restartPolicy other than Never. It only ever
talks to the apiserver on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .kube import Kube, KubeError

log = logging.getLogger("phoenix-lab.node-agent")

GPU = "nvidia.com/gpu"
SPOT_LABEL = "phoenix.dev/spot"
HEARTBEAT_SECONDS = 10
TERMINATION_LOG_ENV = "PHOENIX_TERMINATION_LOG"
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_BYTES = 2048
# Environment a pod process inherits from the agent; everything else comes from the pod spec.
PASSTHROUGH_ENV = ("HOME", "LANG", "LC_ALL", "TMPDIR", "PHOENIX_CACHE", "UV_CACHE_DIR")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    spot: bool
    gpus: int

    def manifest(self) -> dict:
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
                  SPOT_LABEL: "true" if self.spot else "false",
                  "phoenix.dev/lab": "true"}
        taints = [{"key": SPOT_LABEL, "value": "true", "effect": "NoSchedule"}] if self.spot else []
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        if self.gpus:
            capacity[GPU] = str(self.gpus)
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": labels},
            "spec": {"taints": taints},
            "status": {"capacity": capacity, "allocatable": capacity,
                       "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                     {"type": "Hostname", "address": self.name}],
                       "conditions": node_conditions(),
                       "nodeInfo": {"kubeletVersion": "phoenix-lab", "operatingSystem": "linux",
                                    "architecture": "amd64", "containerRuntimeVersion": "lab://1",
                                    "kernelVersion": "", "osImage": "phoenix-lab",
                                    "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                                    "bootID": ""}},
        }


def node_conditions() -> list[dict]:
    t = now_iso()
    ok = [("MemoryPressure", "KubeletHasSufficientMemory"), ("DiskPressure", "KubeletHasNoDiskPressure"),
          ("PIDPressure", "KubeletHasSufficientPID")]
    conds = [{"type": c, "status": "False", "reason": r, "message": "lab node",
              "lastHeartbeatTime": t, "lastTransitionTime": t} for c, r in ok]
    conds.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                  "message": "phoenix lab node agent is posting ready status",
                  "lastHeartbeatTime": t, "lastTransitionTime": t})
    return conds


# ---- scheduling (pure) ----------------------------------------------------------------------

def _tolerates(tolerations: list[dict], taint: dict) -> bool:
    for t in tolerations or []:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        op = t.get("operator", "Equal")
        if op == "Exists" and (not t.get("key") or t["key"] == taint["key"]):
            return True
        if op == "Equal" and t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _match_expression(labels: dict, expr: dict) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values") or []
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    return False


def gpu_request(pod: dict) -> int:
    total = 0
    for c in pod["spec"].get("containers", []):
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU) or (res.get("requests") or {}).get(GPU) or 0
        total += int(value)
    return total


def node_fits(pod: dict, node: dict, gpus_used: int) -> str | None:
    """None when `pod` may run on `node`, else the reason it may not."""
    spec = pod["spec"]
    labels = node["metadata"].get("labels", {})
    for k, v in (spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return f"node selector {k}={v}"
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required:
        terms = required.get("nodeSelectorTerms") or []
        if not any(all(_match_expression(labels, e) for e in (t.get("matchExpressions") or []))
                   for t in terms):
            return "node affinity"
    for taint in node.get("spec", {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(spec.get("tolerations"), taint):
            return f"untolerated taint {taint['key']}"
    capacity = int(node.get("status", {}).get("allocatable", {}).get(GPU, 0))
    if gpu_request(pod) > capacity - gpus_used:
        return f"insufficient {GPU}"
    return None


def choose_node(pod: dict, nodes: list[dict], gpus_used: dict[str, int]) -> tuple[str | None, list[str]]:
    """Pick the feasible node with the fewest GPUs in use; return (name, reasons for the rest)."""
    reasons, feasible = [], []
    for node in nodes:
        why = node_fits(pod, node, gpus_used.get(node["metadata"]["name"], 0))
        if why is None:
            feasible.append(node["metadata"]["name"])
        else:
            reasons.append(why)
    if not feasible:
        return None, reasons
    return min(feasible, key=lambda n: (gpus_used.get(n, 0), n)), reasons


# ---- environment ----------------------------------------------------------------------------

class ConfigError(Exception):
    """The pod's container configuration cannot be resolved (CreateContainerConfigError)."""


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion in command, args and env values."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)


# ---- the agent --------------------------------------------------------------------------------

@dataclass
class Running:
    pod_key: str
    uid: str
    node: str
    pod_dir: Path
    procs: dict[str, subprocess.Popen]
    started_at: str
    exit: dict[str, dict] = field(default_factory=dict)  # container -> terminated state
    term_sent: float | None = None
    kill_at: float | None = None
    reported: bool = False
    abandoned: bool = False


class NodeAgent:
    def __init__(self, kube: Kube, state_dir: Path, apiserver_port: int, ca_file: str,
                 spot_nodes: int = 2, gpus_per_node: int = 4) -> None:
        self.kube = kube
        self.state_dir = state_dir
        self.apiserver_port = apiserver_port
        self.ca_file = ca_file
        self.gpus_per_node = gpus_per_node
        self.nodes: dict[str, NodeSpec] = {}
        self.running: dict[str, Running] = {}  # by pod uid
        self.unschedulable_reported: set[str] = set()
        self.config_retry_at: dict[str, float] = {}  # pod uid -> when to retry a config error
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.python_bin = str(Path(sys.executable).parent)
        self._counter_file = state_dir / "run" / "node-counter"
        self._initial = [NodeSpec("lab-ondemand-0", spot=False, gpus=0)] + [
            NodeSpec(f"lab-spot-{i}", spot=True, gpus=gpus_per_node) for i in range(1, spot_nodes + 1)]

    # -- nodes --
    def register_nodes(self) -> None:
        existing = {n["metadata"]["name"] for n in self.kube.get("/api/v1/nodes")["items"]}
        wanted = list(self._initial)
        # After a restart, adopt replacement spot nodes that are still registered.
        for name in existing:
            if name.startswith("lab-spot-") and all(n.name != name for n in wanted):
                wanted.append(NodeSpec(name, spot=True, gpus=self.gpus_per_node))
        for spec in wanted:
            self._register(spec)

    def _register(self, spec: NodeSpec) -> None:
        try:
            self.kube.post("/api/v1/nodes", spec.manifest())
            log.info("registered node %s (spot=%s, gpus=%d)", spec.name, spec.spot, spec.gpus)
        except KubeError as e:
            if e.status != 409:
                raise
        self.nodes[spec.name] = spec
        self._heartbeat(spec.name)

    def _next_spot_name(self) -> str:
        try:
            n = int(self._counter_file.read_text())
        except (OSError, ValueError):
            n = len(self._initial)
        while True:
            n += 1
            name = f"lab-spot-{n}"
            if name not in self.nodes:
                self._counter_file.write_text(str(n))
                return name

    def _heartbeat(self, name: str) -> None:
        self.kube.merge_patch(f"/api/v1/nodes/{name}/status",
                              {"status": {"conditions": node_conditions()}}, ok_missing=True)
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                         "renewTime": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
        try:
            if self.kube.merge_patch(lease_path, {"spec": body["spec"]}, ok_missing=True) is None:
                self.kube.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body)
        except KubeError as e:
            log.debug("lease for %s: %s", name, e)

    def check_lost_nodes(self, api_nodes: set[str]) -> None:
        for name in [n for n in self.nodes if n not in api_nodes]:
            spec = self.nodes.pop(name)
            victims = [r for r in self.running.values() if r.node == name and not r.abandoned]
            log.warning("node %s is gone: killing %d pod process(es) without report", name, len(victims))
            for r in victims:
                r.abandoned = True
                for p in r.procs.values():
                    _signal_group(p, signal.SIGKILL)
            if spec.spot:
                self._register(NodeSpec(self._next_spot_name(), spot=True, gpus=spec.gpus))
            else:
                self._register(spec)

    # -- main loop --
    def run(self) -> None:
        self.register_nodes()
        ready = self.state_dir / "run" / "node-agent.ready"
        threading.Thread(target=self._watch_pods, daemon=True, name="watch").start()
        ready.write_text(str(os.getpid()))
        last_beat = time.monotonic()
        try:
            while not self.stopping.is_set():
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                try:
                    self.reconcile()
                    if time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                        for name in list(self.nodes):
                            self._heartbeat(name)
                        last_beat = time.monotonic()
                except (KubeError, OSError) as e:
                    log.warning("reconcile: %s", e)
                    time.sleep(1)
        finally:
            ready.unlink(missing_ok=True)
            self.shutdown()

    def _watch_pods(self) -> None:
        while not self.stopping.is_set():
            try:
                rv = self.kube.get("/api/v1/pods", params={"limit": "1"})["metadata"]["resourceVersion"]
                for _ in self.kube.watch("/api/v1/pods", rv, timeout_seconds=120):
                    self.wake.set()
                    if self.stopping.is_set():
                        return
            except Exception as e:  # the watch is only a wake-up; the loop polls anyway
                log.debug("pod watch restarting: %s", e)
                time.sleep(1)

    def shutdown(self) -> None:
        for r in self.running.values():
            for p in r.procs.values():
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for r in self.running.values():
            for p in r.procs.values():
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(p, signal.SIGKILL)

    def reconcile(self) -> None:
        api_nodes = {n["metadata"]["name"]: n for n in self.kube.get("/api/v1/nodes")["items"]}
        self.check_lost_nodes(set(api_nodes))
        pods = self.kube.get("/api/v1/pods")["items"]
        seen = set()
        gpus_used: dict[str, int] = {}
        for pod in pods:
            node = pod["spec"].get("nodeName")
            if node and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                gpus_used[node] = gpus_used.get(node, 0) + gpu_request(pod)
        ours = [n for name, n in api_nodes.items() if name in self.nodes
                and not n.get("spec", {}).get("unschedulable")]
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            node = pod["spec"].get("nodeName")
            if not node:
                self._schedule(pod, ours, gpus_used)
            elif node in self.nodes or uid in self.running:
                self._sync_pod(pod)
        for uid in [u for u in self.running if u not in seen]:
            r = self.running.pop(uid)
            for p in r.procs.values():
                if p.poll() is None:
                    _signal_group(p, signal.SIGKILL)

    # -- scheduling --
    def _schedule(self, pod: dict, nodes: list[dict], gpus_used: dict[str, int]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if spec.get("schedulerName", "default-scheduler") != "default-scheduler" or meta.get("deletionTimestamp"):
            return
        name, reasons = choose_node(pod, nodes, gpus_used)
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        if name is None:
            if meta["uid"] not in self.unschedulable_reported:
                self.unschedulable_reported.add(meta["uid"])
                msg = f"0/{len(nodes)} nodes are available: " + ", ".join(sorted(set(reasons)))
                self._set_conditions(pod, [{"type": "PodScheduled", "status": "False",
                                            "reason": "Unschedulable", "message": msg}])
            return
        try:
            self.kube.post(f"{path}/binding", {"apiVersion": "v1", "kind": "Binding",
                                               "metadata": {"name": meta["name"]},
                                               "target": {"apiVersion": "v1", "kind": "Node", "name": name}})
            gpus_used[name] = gpus_used.get(name, 0) + gpu_request(pod)
            log.info("bound %s/%s to %s", meta["namespace"], meta["name"], name)
        except KubeError as e:
            if e.status not in (404, 409):
                raise

    def _set_conditions(self, pod: dict, new: list[dict], extra_status: dict | None = None) -> None:
        t = now_iso()
        types = {c["type"] for c in new}
        conds = [c for c in pod.get("status", {}).get("conditions") or [] if c["type"] not in types]
        conds += [{"lastProbeTime": None, "lastTransitionTime": t, **c} for c in new]
        meta = pod["metadata"]
        status = {"conditions": conds, **(extra_status or {})}
        self.kube.merge_patch(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                              {"status": status}, ok_missing=True)

    # -- running pods --
    def _sync_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        phase = pod.get("status", {}).get("phase", "Pending")
        r = self.running.get(uid)
        deleting = meta.get("deletionTimestamp") is not None
        if r is not None and r.abandoned:
            return
        if r is None:
            if deleting:
                self._final_delete(pod)
            elif phase == "Pending" and time.monotonic() >= self.config_retry_at.get(uid, 0):
                self._start(pod)
            elif phase == "Running":
                # The agent restarted and lost this pod's process: report it like a kubelet would.
                self._report_unknown(pod)
            return
        for name, p in r.procs.items():
            if name not in r.exit and p.poll() is not None:
                r.exit[name] = self._terminated_state(r, pod, name, p.returncode)
        if deleting and len(r.exit) < len(r.procs):
            now = time.monotonic()
            if r.term_sent is None:
                grace = meta.get("deletionGracePeriodSeconds")
                grace = 30 if grace is None else int(grace)
                r.term_sent, r.kill_at = now, now + grace
                log.info("terminating %s (grace %ss)", r.pod_key, grace)
                for p in r.procs.values():
                    _signal_group(p, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            elif now >= r.kill_at:
                log.info("grace period over for %s: SIGKILL", r.pod_key)
                for p in r.procs.values():
                    _signal_group(p, signal.SIGKILL)
                r.kill_at = now + 3600
            return
        if len(r.exit) == len(r.procs) and not r.reported:
            self._report_terminated(pod, r)
            r.reported = True
            (r.pod_dir / "pid").unlink(missing_ok=True)
        if r.reported and deleting:
            self._final_delete(pod)
            self.running.pop(uid, None)

    def _final_delete(self, pod: dict) -> None:
        meta = pod["metadata"]
        try:
            self.kube.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                             {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
                             ok_missing=True)
        except KubeError as e:
            if e.status != 409:
                raise

    def _pod_env(self, pod: dict, container: dict, pod_dir: Path) -> dict[str, str]:
        meta = pod["metadata"]
        ns = meta["namespace"]
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        env["PATH"] = f"{self.python_bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
        env.update({"HOSTNAME": meta["name"], "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                    "KUBERNETES_SERVICE_PORT": str(self.apiserver_port),
                    TERMINATION_LOG_ENV: str(pod_dir / f"termination-log-{container['name']}")})
        for src in container.get("envFrom") or []:
            kind = "Secret" if "secretRef" in src else "ConfigMap"
            ref = src["secretRef" if kind == "Secret" else "configMapRef"]
            data = self._source_data(kind, ns, ref["name"], ref.get("optional"))
            env.update({src.get("prefix", "") + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item or "valueFrom" not in item:
                env[name] = expand(item.get("value", ""), env)
                continue
            vf = item["valueFrom"]
            if "fieldRef" in vf:
                env[name] = self._field(pod, vf["fieldRef"]["fieldPath"])
                continue
            kind = "Secret" if "secretKeyRef" in vf else "ConfigMap" if "configMapKeyRef" in vf else None
            if kind is None:
                continue  # resourceFieldRef: the lab has no resource accounting to report
            ref = vf["secretKeyRef" if kind == "Secret" else "configMapKeyRef"]
            data = self._source_data(kind, ns, ref["name"], ref.get("optional"))
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional"):
                raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ns}/{ref['name']}")
        token_kubeconfig = self._service_account_kubeconfig(pod, pod_dir)
        if token_kubeconfig:
            env["KUBECONFIG"] = token_kubeconfig
        return env

    def _field(self, pod: dict, path: str) -> str:
        meta = pod["metadata"]
        simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                  "metadata.uid": meta["uid"], "spec.nodeName": pod["spec"].get("nodeName", ""),
                  "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
                  "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
        if path in simple:
            return simple[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        raise ConfigError(f"unsupported fieldRef {path}")

    def _source_data(self, kind: str, ns: str, name: str, optional: bool | None) -> dict[str, str]:
        """The decoded data of a Secret or ConfigMap ({} if optional and missing)."""
        obj = self.kube.get(f"/api/v1/namespaces/{ns}/{kind.lower()}s/{name}", ok_missing=True)
        if obj is None:
            if optional:
                return {}
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        data = obj.get("data") or {}
        if kind == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in data.items()}
        return dict(data)

    def _service_account_kubeconfig(self, pod: dict, pod_dir: Path) -> str | None:
        spec, meta = pod["spec"], pod["metadata"]
        if spec.get("automountServiceAccountToken") is False:
            return None
        sa = spec.get("serviceAccountName") or "default"
        try:
            tr = self.kube.post(
                f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                 "spec": {"expirationSeconds": 86400,
                          "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                             "name": meta["name"], "uid": meta["uid"]}}})
        except KubeError as e:
            log.warning("no token for %s/%s: %s", meta["namespace"], sa, e)
            return None
        user = f"system:serviceaccount:{meta['namespace']}:{sa}"
        ca = base64.b64encode(Path(self.ca_file).read_bytes()).decode()
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "in-lab",
                  "clusters": [{"name": "lab", "cluster": {
                      "server": f"https://127.0.0.1:{self.apiserver_port}",
                      "certificate-authority-data": ca}}],
                  "users": [{"name": user, "user": {"token": tr["status"]["token"]}}],
                  "contexts": [{"name": "in-lab", "context": {
                      "cluster": "lab", "user": user, "namespace": meta["namespace"]}}]}
        path = pod_dir / "kubeconfig"
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(config))
        return str(path)

    def _start(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        key = f"{meta['namespace']}/{meta['name']}"
        pod_dir = self.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        if spec.get("initContainers"):
            log.warning("%s: init containers are not supported by the lab and are skipped", key)
        try:
            launches = []
            for c in spec["containers"]:
                env = self._pod_env(pod, c, pod_dir)
                argv = [expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]
                if not c.get("command"):
                    raise ConfigError(f"container {c['name']}: the lab runs containers as host "
                                      "processes and needs an explicit command")
                exe = shutil.which(argv[0], path=env["PATH"]) or argv[0]
                workdir = c.get("workingDir")
                cwd = workdir if workdir and Path(workdir).is_dir() else str(pod_dir)
                launches.append((c["name"], [exe, *argv[1:]], env, cwd))
        except ConfigError as e:
            self.config_retry_at[meta["uid"]] = time.monotonic() + 5
            self._report_waiting(pod, "CreateContainerConfigError", str(e))
            return
        procs, started = {}, now_iso()
        for name, argv, env, cwd in launches:
            with open(pod_dir / f"{name}.log", "ab") as out:
                try:
                    procs[name] = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True)
                except OSError as e:
                    for p in procs.values():
                        _signal_group(p, signal.SIGKILL)
                    self._report_waiting(pod, "RunContainerError", f"{name}: {e}")
                    return
        first = next(iter(procs.values()))
        (pod_dir / "pid").write_text(str(first.pid))
        self.running[meta["uid"]] = Running(key, meta["uid"], spec["nodeName"], pod_dir, procs, started)
        log.info("started %s on %s (pid %d)", key, spec["nodeName"], first.pid)
        statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "",
                     "containerID": f"lab://{meta['uid']}/{c['name']}", "ready": True, "started": True,
                     "restartCount": 0, "state": {"running": {"startedAt": started}}}
                    for c in spec["containers"]]
        self._set_conditions(pod, [{"type": t, "status": "True"} for t in
                                   ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")],
                             {"phase": "Running", "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
                              "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                              "startTime": started, "containerStatuses": statuses})

    def _report_waiting(self, pod: dict, reason: str, message: str) -> None:
        log.warning("%s/%s: %s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], reason, message)
        statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                     "started": False, "restartCount": 0,
                     "state": {"waiting": {"reason": reason, "message": message}}}
                    for c in pod["spec"]["containers"]]
        self._set_conditions(pod, [{"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"},
                                   {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
                             {"containerStatuses": statuses})

    def _terminated_state(self, r: Running, pod: dict, name: str, returncode: int) -> dict:
        code = 128 - returncode if returncode < 0 else returncode
        state = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                 "startedAt": r.started_at, "finishedAt": now_iso(),
                 "containerID": f"lab://{r.uid}/{name}"}
        if returncode < 0:
            state["signal"] = -returncode
        message = _read_head(r.pod_dir / f"termination-log-{name}", MAX_TERMINATION_MESSAGE)
        container = next((c for c in pod["spec"]["containers"] if c["name"] == name), {})
        if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = _read_tail(r.pod_dir / f"{name}.log", FALLBACK_LOG_BYTES)
        if message:
            state["message"] = message
        log.info("%s container %s exited with %d", r.pod_key, name, code)
        return state

    def _report_terminated(self, pod: dict, r: Running) -> None:
        statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "",
                     "containerID": f"lab://{r.uid}/{c['name']}", "ready": False, "started": False,
                     "restartCount": 0, "state": {"terminated": r.exit[c["name"]]}}
                    for c in pod["spec"]["containers"]]
        ok = all(s["exitCode"] == 0 for s in r.exit.values())
        self._set_conditions(pod, [{"type": "ContainersReady", "status": "False", "reason": "PodCompleted"},
                                   {"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                             {"phase": "Succeeded" if ok else "Failed", "containerStatuses": statuses})

    def _report_unknown(self, pod: dict) -> None:
        t = now_iso()
        statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                     "started": False, "restartCount": 0,
                     "state": {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                              "message": "The container could not be located when the "
                                                         "pod was terminated", "finishedAt": t}}}
                    for c in pod["spec"]["containers"]]
        self._set_conditions(pod, [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                             {"phase": "Failed", "containerStatuses": statuses})


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_head(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode(errors="replace")
    except OSError:
        return ""


def _read_tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--apiserver-port", required=True, type=int)
    ap.add_argument("--spot-nodes", type=int, default=2)
    ap.add_argument("--gpus-per-node", type=int, default=4)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    pki = args.state_dir / "pki"
    kube = Kube(f"https://127.0.0.1:{args.apiserver_port}", str(pki / "ca.crt"),
                str(pki / "admin.crt"), str(pki / "admin.key"))
    agent = NodeAgent(kube, args.state_dir, args.apiserver_port, str(pki / "ca.crt"),
                      spot_nodes=args.spot_nodes, gpus_per_node=args.gpus_per_node)
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set() or agent.wake.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stopping.set() or agent.wake.set())
    agent.run()


if __name__ == "__main__":
    main()
