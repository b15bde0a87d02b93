"""The lab cluster: a real Kubernetes control plane and real nodes on this machine.

etcd, kube-apiserver (Node + RBAC authorization; NodeRestriction,
OwnerReferencesPermissionEnforcement and PodSecurity admission, restricted by default),
kube-controller-manager, kube-scheduler and CoreDNS run as host processes; each node is a
real kubelet + containerd + CNI bridge (`nodes.py`) running the repository's own images.
One on-demand node and two GPU spot nodes; an S3 server (versitygw) for checkpoints, and
on demand a second one (SeaweedFS, TLS with the lab CA; ``Lab.s3_server_for``).

`Lab.up()` is idempotent (running parts are left alone) and cleans up after a crash;
`Lab.down()` removes every process, mount, network namespace, bridge, route and rule it
made. Addresses and the rules that keep traffic on this machine: `network.py`.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal as _signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import yaml

from . import images, paths
from .certs import PKI, ensure_client_cert, ensure_pki
from .network import LabNetwork, claim_net_index, labs_running, slice_owner
from .nodes import (GPU, Node, NodeSpec, ctr, ensure_node_image, node_image_root,
                    processes_of)
from .procs import (LabError, Service, free_port, http_ready, pid_alive, require_free_port,
                    tcp_ready)
from .s3 import SERVER_NAMES, S3Endpoint, S3Server, SeaweedS3Server

K8S_VERSION_PREFIX = "v1.35."
GPUS_PER_SPOT_NODE = 4
SPOT_NODES = 2
# Every namespace is restricted unless it says otherwise; only the control plane's own
# namespaces are exempt (the lab runs nothing there).
_ADMISSION_CONFIG = {
    "apiVersion": "apiserver.config.k8s.io/v1", "kind": "AdmissionConfiguration",
    "plugins": [{"name": "PodSecurity", "configuration": {
        "apiVersion": "pod-security.admission.config.k8s.io/v1",
        "kind": "PodSecurityConfiguration",
        "defaults": {"enforce": "restricted", "enforce-version": "latest",
                     "audit": "restricted", "warn": "restricted"},
        "exemptions": {"usernames": [], "runtimeClasses": [],
                       "namespaces": ["kube-system"]}}}],
}
# The apiserver's audit log keeps every write (who, with which user agent, when), nothing
# else: what tests assert on when something must not have written (a deposed operator leader).
_AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata",
               "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
              {"level": "None"}],
}
# CoreDNS's identity may read what the kubernetes plugin serves, nothing else.
_COREDNS_RBAC = [
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
     "metadata": {"name": "phoenix-lab:coredns"},
     "rules": [{"apiGroups": [""], "resources": ["services", "pods", "namespaces"],
                "verbs": ["list", "watch"]},
               {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                "verbs": ["list", "watch"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
     "metadata": {"name": "phoenix-lab:coredns"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                 "name": "phoenix-lab:coredns"},
     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                   "name": "system:phoenix-lab-coredns"}]},
]


@dataclass
class LabPorts:
    etcd: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    s3: int
    scheduler: int
    dns_ready: int

    @classmethod
    def fixed(cls) -> "LabPorts":
        """Stable ports for the developer's lab (demo), overridable by environment."""
        env = os.environ.get
        return cls(
            etcd=int(env("PHOENIX_LAB_ETCD_PORT", 23790)),
            etcd_peer=int(env("PHOENIX_LAB_ETCD_PEER_PORT", 23800)),
            apiserver=int(env("PHOENIX_LAB_APISERVER_PORT", 16443)),
            controller_manager=int(env("PHOENIX_LAB_CM_PORT", 10357)),
            s3=int(env("PHOENIX_LAB_S3_PORT", 17070)),
            scheduler=int(env("PHOENIX_LAB_SCHEDULER_PORT", 10359)),
            dns_ready=int(env("PHOENIX_LAB_DNS_READY_PORT", 18181)),
        )

    @classmethod
    def ephemeral(cls) -> "LabPorts":
        """Free ports picked now, for test sessions that must not collide with a demo lab."""
        return cls(*(free_port() for _ in range(7)))


Progress = Callable[[str], None]


def _print_progress(msg: str) -> None:
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


def reap_stale_labs(progress: Progress = _print_progress) -> None:
    """Tear down labs whose creating process and control plane died without `down` (a killed
    test session): their nodes, mounts, bridges and rules would otherwise stay behind and
    hold a slice."""
    for index in labs_running():
        claimed = slice_owner(index)
        if claimed is None or pid_alive(claimed[1]) or not (claimed[0] / "lab.json").exists():
            continue  # unknown, or its process lives (it may still be starting)
        owner = claimed[0]
        lab = Lab(owner, progress=progress)
        if not lab._etcd().running():
            progress(f"cleaning up the stale lab in {owner} (slice {index})")
            lab.down()


def initial_nodes(spot_nodes: int = SPOT_NODES) -> list[NodeSpec]:
    return [NodeSpec("lab-ondemand-0", 0, spot=False, gpus=0)] + [
        NodeSpec(f"lab-spot-{i}", i, spot=True, gpus=GPUS_PER_SPOT_NODE)
        for i in range(1, spot_nodes + 1)]


def prepare_node_image(refs: dict[str, str], progress: Progress) -> Path:
    """The node image holding ``refs`` (``images.ensure_all``'s result), made if missing."""
    return ensure_node_image([refs["pause"], refs["operator"], refs["trainer"]],
                             images.stamp(refs), lambda ref: images.save_image(ref, progress),
                             progress)


def prepare(progress: Progress = _print_progress) -> Path:
    """Everything ``Lab.up`` needs built before it starts a process: the images and the
    node image. ``lab/bootstrap.sh`` runs it beside the Go builds, so a fresh machine's
    first ``up`` starts the lab instead of building."""
    return prepare_node_image(images.ensure_all(progress), progress)


class _Steps:
    """``with steps("name"):`` adds the block's seconds to ``timings["name"]``."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - t0


class Lab:
    def __init__(self, state_dir: Path | None = None, ports: LabPorts | None = None,
                 progress: Progress = _print_progress, spot_nodes: int = SPOT_NODES) -> None:
        """``spot_nodes``: how many spot nodes a new lab starts with (a saved lab keeps its
        own; benchmarks that keep node pools apart ask for more)."""
        self.state_dir = Path(state_dir or paths.default_state_dir()).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self._saved = self.state_dir / "lab.json"
        if self._saved.exists():
            saved = json.loads(self._saved.read_text())
            self.ports = LabPorts(**saved["ports"])
            self.net = LabNetwork(saved["net_index"])
            self.node_specs = [NodeSpec(**n) for n in saved["nodes"]]
            self.node_image_stamp = saved.get("node_image")
        else:
            # The developer's lab (fixed ports) owns slice 0; test labs take a free one.
            self.ports = ports or LabPorts.fixed()
            if ports is not None:
                reap_stale_labs(self.progress)
            self.net = LabNetwork(0 if ports is None else claim_net_index(self.state_dir))
            self.node_specs = initial_nodes(spot_nodes)
            self.node_image_stamp = None
            self._save()
        self.pki = PKI(self.state_dir / "pki")
        self.s3_server = S3Server(self.state_dir / "s3", port=self.ports.s3,
                                  host=self.net.host_ip)
        self._seaweed_server: SeaweedS3Server | None = None  # s3_server_for("seaweedfs")
        self.images: dict[str, str] = {}
        # Seconds each step of the last up() took (images, node image, control plane, ...):
        # what a cold start spends where (tests/timing_report.py prints it).
        self.timings: dict[str, float] = {}

    def _save(self) -> None:
        self._saved.write_text(json.dumps({
            "ports": asdict(self.ports), "net_index": self.net.index,
            "nodes": [asdict(n) for n in self.node_specs],
            "node_image": self.node_image_stamp}, indent=2))

    # ---- paths and clients -------------------------------------------------------------
    @property
    def host_ip(self) -> str:
        """Where pods and host tools reach the apiserver, S3 and DNS."""
        return self.net.host_ip

    @property
    def server_url(self) -> str:
        return f"https://{self.host_ip}:{self.ports.apiserver}"

    @property
    def kubeconfig(self) -> str:
        return str(self.state_dir / "kubeconfig")

    @property
    def s3(self) -> S3Endpoint:
        return self.s3_server.endpoint

    def s3_server_for(self, name: str) -> S3Server | SeaweedS3Server:
        """The lab's S3 server called ``name`` (``phoenix_lab.s3.SERVER_NAMES``), running on
        the host address where pods reach it: versitygw (plain HTTP, started by ``up``) or
        SeaweedFS (HTTPS with a certificate from the lab CA naming the host address, started
        here on first use; its ``endpoint.ca_bundle`` is the lab CA, which a PhoenixJob's
        ``spec.checkpoint.caBundle`` and the chart's ``storage.caBundle`` must carry)."""
        if name not in SERVER_NAMES:
            raise LabError(f"no lab S3 server named {name!r}; choose from "
                           f"{', '.join(SERVER_NAMES)}")
        server = self.s3_server if name == "versitygw" else self._seaweed()
        if not server.running():
            self.progress(f"starting S3 server ({name}) on {self.host_ip}")
        server.start()
        return server

    def _seaweed(self) -> SeaweedS3Server:
        if self._seaweed_server is None:
            self._seaweed_server = SeaweedS3Server(self.state_dir / "seaweedfs", host=self.host_ip,
                                                   pki=self.pki)
        return self._seaweed_server

    def _seaweed_started(self) -> SeaweedS3Server | None:
        """The SeaweedFS server if this lab ever made one (its state dir exists), without
        making one (a certificate, credentials) just to find it stopped."""
        if self._seaweed_server is None and not (self.state_dir / "seaweedfs").exists():
            return None
        return self._seaweed()

    @property
    def trainer_image(self) -> str:
        return self._image("trainer")

    @property
    def operator_image(self) -> str:
        return self._image("operator")

    def _image(self, kind: str) -> str:
        if not self.images:
            self.images = images.built_images()
        return self.images[kind]

    def _services(self) -> list[Service]:
        return [self._etcd(), self._apiserver(), self._controller_manager(),
                self._scheduler(), self._coredns()]

    def nodes(self) -> list[Node]:
        return [self._node(spec) for spec in self.node_specs]

    def node(self, name: str) -> Node:
        for spec in self.node_specs:
            if spec.name == name:
                return self._node(spec)
        raise LabError(f"no lab node named {name!r} (nodes: "
                       f"{', '.join(s.name for s in self.node_specs)})")

    def _node(self, spec: NodeSpec) -> Node:
        return Node(spec, self.state_dir, self.net, ca_file=self.pki.ca_cert,
                    kubeconfig=str(self.state_dir / "nodes" / f"{spec.name}.kubeconfig"),
                    dns_ip=self.host_ip, pause_image=images.PAUSE_IMAGE)

    def _node_credentials(self, node: Node) -> None:
        """The kubelet's own identity, system:node:<name> (Node authorizer, NodeRestriction)."""
        cert = f"node-{node.name}"
        ensure_client_cert(self.pki, cert, f"system:node:{node.name}", "system:nodes")
        Path(node.kubeconfig).parent.mkdir(parents=True, exist_ok=True)
        self._write_kubeconfig(cert, Path(node.kubeconfig))

    def _etcd(self) -> Service:
        p = self.ports
        return Service(
            name="etcd", state_dir=self.state_dir, ready=tcp_ready(p.etcd),
            argv=[str(paths.binary("etcd")), "--name", "lab",
                  "--data-dir", str(self.state_dir / "etcd"),
                  "--listen-client-urls", f"http://127.0.0.1:{p.etcd}",
                  "--advertise-client-urls", f"http://127.0.0.1:{p.etcd}",
                  "--listen-peer-urls", f"http://127.0.0.1:{p.etcd_peer}",
                  "--initial-advertise-peer-urls", f"http://127.0.0.1:{p.etcd_peer}",
                  "--initial-cluster", f"lab=http://127.0.0.1:{p.etcd_peer}",
                  # The lab's etcd holds throwaway state: skip fsync to keep 2 cores free.
                  "--unsafe-no-fsync", "--log-level", "warn"],
        )

    def _apiserver(self) -> Service:
        pki = self.pki
        return Service(
            name="kube-apiserver", state_dir=self.state_dir, ready=self._apiserver_ready,
            argv=[str(paths.binary("kube-apiserver")),
                  f"--etcd-servers=http://127.0.0.1:{self.ports.etcd}",
                  f"--bind-address={self.host_ip}", f"--advertise-address={self.host_ip}",
                  f"--secure-port={self.ports.apiserver}",
                  f"--tls-cert-file={pki.cert('apiserver')}",
                  f"--tls-private-key-file={pki.key('apiserver')}",
                  f"--client-ca-file={pki.ca_cert}",
                  "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                  f"--service-account-key-file={pki.sa_pub}",
                  f"--service-account-signing-key-file={pki.sa_key}",
                  f"--service-cluster-ip-range={self.net.service_range}",
                  "--authorization-mode=Node,RBAC",
                  "--enable-admission-plugins=NodeRestriction,"
                  "OwnerReferencesPermissionEnforcement,PodSecurity",
                  f"--admission-control-config-file={self.state_dir / 'admission.yaml'}",
                  f"--kubelet-client-certificate={pki.cert('apiserver-kubelet-client')}",
                  f"--kubelet-client-key={pki.key('apiserver-kubelet-client')}",
                  "--kubelet-preferred-address-types=InternalIP",
                  "--profiling=false",
                  f"--audit-policy-file={self.state_dir / 'audit-policy.yaml'}",
                  f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
                  "--audit-log-maxsize=64", "--audit-log-maxbackup=1",
                  f"--cert-dir={self.state_dir / 'apiserver-certs'}"],
        )

    def _component_kubeconfig(self, cert: str) -> str:
        return str(self.state_dir / f"{cert}.kubeconfig")

    def _write_configs(self) -> None:
        """Certificates, kubeconfigs and config files every service reads at start."""
        ensure_pki(self.pki.dir, server_ips=(self.host_ip,))
        self._write_kubeconfig("admin", Path(self.kubeconfig))
        for cert in ("controller-manager", "scheduler", "coredns"):
            self._write_kubeconfig(cert, Path(self._component_kubeconfig(cert)))
        (self.state_dir / "admission.yaml").write_text(yaml.safe_dump(_ADMISSION_CONFIG))
        (self.state_dir / "audit-policy.yaml").write_text(yaml.safe_dump(_AUDIT_POLICY))
        (self.state_dir / "Corefile").write_text(f""".:53 {{
    bind {self.host_ip}
    errors
    ready 127.0.0.1:{self.ports.dns_ready}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self._component_kubeconfig("coredns")} phoenix-lab
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")

    def _controller_manager(self) -> Service:
        pki = self.pki
        kc = self._component_kubeconfig("controller-manager")
        return Service(
            name="kube-controller-manager", state_dir=self.state_dir,
            ready=tcp_ready(self.ports.controller_manager),
            argv=[str(paths.binary("kube-controller-manager")),
                  f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                  f"--authorization-kubeconfig={kc}",
                  "--bind-address=127.0.0.1", f"--secure-port={self.ports.controller_manager}",
                  f"--service-account-private-key-file={pki.sa_key}",
                  f"--root-ca-file={pki.ca_cert}", "--use-service-account-credentials=true",
                  f"--cluster-signing-cert-file={pki.ca_cert}",
                  f"--cluster-signing-key-file={pki.ca_key}",
                  f"--service-cluster-ip-range={self.net.service_range}",
                  "--leader-elect=false", "--profiling=false",
                  f"--cert-dir={self.state_dir / 'cm-certs'}"],
        )

    def _scheduler(self) -> Service:
        kc = self._component_kubeconfig("scheduler")
        return Service(
            name="kube-scheduler", state_dir=self.state_dir,
            ready=tcp_ready(self.ports.scheduler),
            argv=[str(paths.binary("kube-scheduler")),
                  f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                  f"--authorization-kubeconfig={kc}",
                  "--bind-address=127.0.0.1", f"--secure-port={self.ports.scheduler}",
                  "--leader-elect=false", "--profiling=false"],
        )

    def _coredns(self) -> Service:
        return Service(
            name="coredns", state_dir=self.state_dir,
            ready=http_ready(f"http://127.0.0.1:{self.ports.dns_ready}/ready"),
            argv=[str(paths.binary("coredns")), "-conf", str(self.state_dir / "Corefile")])

    def _write_kubeconfig(self, cert_name: str, path: Path) -> str:
        b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "phoenix-lab",
            "clusters": [{"name": "phoenix-lab", "cluster": {
                "server": self.server_url, "certificate-authority-data": b64(self.pki.ca_cert)}}],
            "users": [{"name": cert_name, "user": {
                "client-certificate-data": b64(self.pki.cert(cert_name)),
                "client-key-data": b64(self.pki.key(cert_name))}}],
            "contexts": [{"name": "phoenix-lab", "context": {
                "cluster": "phoenix-lab", "user": cert_name}}],
        }
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(config))
        return str(path)

    def _apiserver_ready(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.cert("admin")), str(self.pki.key("admin")))
        try:
            with urllib.request.urlopen(f"{self.server_url}/readyz", context=ctx, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    # ---- lifecycle ---------------------------------------------------------------------
    def up(self) -> "Lab":
        t0 = time.monotonic()
        self.timings = {}
        step = _Steps(self.timings)
        for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                     "kubelet", "coredns", "versitygw"):
            paths.binary(name)  # fail early with a clear message if a binary is missing
        with step("images"):
            self.images = images.ensure_all(self.progress)
        with step("node image"):
            node_image = prepare_node_image(self.images, self.progress)
        with step("control plane"):
            self._start_control_plane()
        stamp = self.node_image_stamp = node_image.parent.name
        self._save()
        with step("nodes"):
            for node in self.nodes():
                if node.running() and node.booted_from() == stamp:
                    self.progress(f"node {node.name}: already running")
                    continue
                if node.running():
                    self.progress(f"node {node.name}: the images changed; rebooting it")
                    node.stop()
                self.progress(f"starting node {node.name} (containerd + kubelet, {node.ip})")
                self._node_credentials(node)
                node.start(node_image, self.progress)
            self.wait_nodes_ready()
        with step("s3"):
            self._start_s3()
        self.timings["total"] = time.monotonic() - t0
        self.progress(f"lab ready in {time.monotonic() - t0:.1f}s; "
                      f"export KUBECONFIG={self.kubeconfig}")
        return self

    def up_control_plane(self) -> "Lab":
        """The control plane (etcd, apiserver, controller-manager, scheduler, CoreDNS) and S3
        only: no images, no nodes. For harnesses that register simulated nodes themselves
        (benchmarks/bench_scale.py); ``down`` tears it down as usual."""
        t0 = time.monotonic()
        for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                     "coredns", "versitygw"):
            paths.binary(name)
        self._start_control_plane()
        self._start_s3()
        self.progress(f"control plane ready in {time.monotonic() - t0:.1f}s (no nodes); "
                      f"export KUBECONFIG={self.kubeconfig}")
        return self

    def _start_control_plane(self) -> None:
        self.net.up()
        self._write_configs()
        port_owner = {
            "etcd": (("127.0.0.1", self.ports.etcd), ("127.0.0.1", self.ports.etcd_peer)),
            "kube-apiserver": ((self.host_ip, self.ports.apiserver),),
            "kube-controller-manager": (("127.0.0.1", self.ports.controller_manager),),
            "kube-scheduler": (("127.0.0.1", self.ports.scheduler),),
            "coredns": (("127.0.0.1", self.ports.dns_ready),),
        }
        for service in self._services():
            if service.running():
                self.progress(f"{service.name}: already running (pid {service.pid()})")
                continue
            for host, port in port_owner.get(service.name, ()):
                require_free_port(port, service.name, host)
            if service.name == "coredns":
                self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_COREDNS_RBAC))
            self.progress(f"starting {service.name}")
            service.start(timeout=120)

    def _start_s3(self) -> None:
        if not self.s3_server.running():
            self.progress("starting S3 server (versitygw)")
        self.s3_server.start()

    def wait_nodes_ready(self, names: list[str] | None = None, timeout: float = 120) -> None:
        """Wait until the nodes registered and are Ready; advertise spot nodes' GPUs."""
        from kubernetes import client

        names = names or [s.name for s in self.node_specs]
        specs = {s.name: s for s in self.node_specs}
        deadline = time.monotonic() + timeout
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            pending = set(names)
            while pending:
                for name in sorted(pending):
                    try:
                        node = core.read_node(name)
                    except client.ApiException as e:
                        if e.status != 404:
                            raise
                        continue
                    gpus = specs[name].gpus
                    if gpus and (node.status.capacity or {}).get(GPU) != str(gpus):
                        # The documented way to advertise an extended resource.
                        core.patch_node_status(name, [{
                            "op": "add", "path": "/status/capacity/nvidia.com~1gpu",
                            "value": str(gpus)}])
                        continue
                    ready = any(c.type == "Ready" and c.status == "True"
                                for c in node.status.conditions or [])
                    if ready and (not gpus or (node.status.allocatable or {}).get(GPU) == str(gpus)):
                        pending.discard(name)
                if not pending:
                    break
                if time.monotonic() > deadline:
                    logs = "\n".join(self.node(n).kubelet.tail(15) for n in pending)
                    raise LabError(f"nodes {sorted(pending)} not Ready after {timeout:.0f}s; "
                                   f"kubelet logs:\n{logs}")
                time.sleep(0.5)

    def down(self) -> None:
        self.s3_server.stop()
        if (seaweed := self._seaweed_started()) is not None:
            seaweed.stop()
        for node in self.nodes():
            if node.running():
                self.progress(f"stopping node {node.name}")
            node.stop()
        for service in reversed(self._services()):
            if service.running():
                self.progress(f"stopping {service.name}")
            service.stop()
        self.net.down()
        if not labs_running() and images.stop_docker():
            self.progress("stopped the lab's image builder (dockerd); no lab is running")

    def status(self) -> dict[str, bool]:
        result = {s.name: s.running() for s in self._services()}
        for node in self.nodes():
            result[f"node/{node.name}"] = node.running()
        result["s3"] = self.s3_server.running()
        if result["kube-apiserver"]:
            result["apiserver-ready"] = self._apiserver_ready()
        return result

    # ---- tools ---------------------------------------------------------------------------
    def tool_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = self.kubeconfig
        env["PATH"] = f"{paths.bin_dir()}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
        return self._tool("kubectl", args, check, input, timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return self._tool("helm", args, check, None, timeout)

    def _tool(self, name, args, check, input, timeout) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(paths.binary(name)), *args], env=self.tool_env(),
                              capture_output=True, text=True, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise LabError(f"{name} {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.log"

    def audit_writes(self, user_agent: str | None = None) -> list[dict]:
        """The API writes the audit log holds (newest file only), optionally only those
        whose user agent contains ``user_agent``."""
        try:
            lines = self.audit_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written
            if user_agent is None or user_agent in (event.get("userAgent") or ""):
                events.append(event)
        return events

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)

    def serviceaccount_kubeconfig(self, namespace: str, name: str,
                                  expiration_seconds: int = 3600 * 6) -> str:
        """A kubeconfig that authenticates as a ServiceAccount (TokenRequest), so RBAC applies."""
        from kubernetes import client

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            token = core.create_namespaced_service_account_token(
                name, namespace, client.AuthenticationV1TokenRequest(
                    spec=client.V1TokenRequestSpec(audiences=[],
                                                   expiration_seconds=expiration_seconds)),
            ).status.token
        return write_token_kubeconfig(
            self.state_dir / f"sa-{namespace}-{name}.kubeconfig", self.server_url,
            self.pki.ca_cert, f"system:serviceaccount:{namespace}:{name}", token)

    # ---- disruptions ---------------------------------------------------------------------
    def evict(self, namespace: str, pod: str, grace_seconds: int | None = None) -> None:
        """Evict a pod through the Eviction API, as a node drain or spot reclaim would."""
        from kubernetes import client

        body = client.V1Eviction(
            metadata=client.V1ObjectMeta(name=pod, namespace=namespace),
            delete_options=(client.V1DeleteOptions(grace_period_seconds=grace_seconds)
                            if grace_seconds is not None else None))
        with self.api_client() as api:
            client.CoreV1Api(api).create_namespaced_pod_eviction(pod, namespace, body)

    def lose_node(self, node: str, wait: bool = False) -> Node:
        """Lose a node: its kubelet, containerd and containers die at once, without a word.

        Then the lab plays the cloud: the vanished instance's Node object is deleted (as a
        cloud node controller does) and a replacement spot node registers. Returns the
        replacement, started; its GPUs are advertised by `wait_nodes_ready`, which
        ``wait=True`` calls (callers that must not block call it in the background).
        """
        from kubernetes import client

        lost = self.node(node)
        lost.kill()
        with self.api_client() as api:
            try:
                client.CoreV1Api(api).delete_node(node)
            except client.ApiException as e:
                if e.status != 404:
                    raise
        lost.cleanup()
        lost.remove_files()
        index = max(s.index for s in self.node_specs) + 1
        spec = NodeSpec(f"lab-spot-{index}", index, spot=True, gpus=GPUS_PER_SPOT_NODE)
        self.node_specs = [s for s in self.node_specs if s.name != node] + [spec]
        self._save()
        replacement = self._node(spec)
        self._node_credentials(replacement)
        replacement.start(node_image_root(self.node_image_stamp), self.progress)
        self.progress(f"node {node} lost; replacement {spec.name} starting")
        if wait:
            self.wait_nodes_ready([spec.name])
        return replacement

    def add_cold_node(self, registry: str, wait: bool = True) -> Node:
        """Start one more spot node that has none of the project's images and pulls from the
        lab's registry at ``registry`` (``registry.Registry.address``), as a fresh cloud spot
        node pulls the trainer image; ``remove_node`` takes it away again."""
        index = max(s.index for s in self.node_specs) + 1
        spec = NodeSpec(f"lab-cold-{index}", index, spot=True, gpus=GPUS_PER_SPOT_NODE,
                        registry=registry)
        self.node_specs = [*self.node_specs, spec]
        self._save()
        node = self._node(spec)
        self._node_credentials(node)
        self.progress(f"starting cold node {spec.name} (pulls from {registry})")
        node.start(node_image_root(self.node_image_stamp), self.progress)
        if wait:
            self.wait_nodes_ready([spec.name])
        return node

    def remove_node(self, name: str) -> None:
        """Stop a node, delete its Node object and its files (a pulled image's GBs with them)."""
        from kubernetes import client

        self.node(name).stop()
        with self.api_client() as api:
            try:
                client.CoreV1Api(api).delete_node(name)
            except client.ApiException as e:
                if e.status != 404:
                    raise
        self.node_specs = [s for s in self.node_specs if s.name != name]
        self._save()

    def node_processes(self, node: str) -> list[int]:
        """Processes of a node (kubelet, containerd, shims) still alive, lost or not."""
        return processes_of(self.state_dir / "nodes" / node)

    def container(self, namespace: str, pod: str, timeout: float = 15) -> tuple[Node, str]:
        """The node running a pod and its (first) container's runtime id. A container can
        run before its kubelet's next status update names it: wait up to ``timeout``."""
        from kubernetes import client

        deadline = time.monotonic() + timeout
        with self.api_client() as api:
            while True:
                p = client.CoreV1Api(api).read_namespaced_pod(pod, namespace)
                statuses = p.status.container_statuses or []
                if p.spec.node_name and statuses and statuses[0].container_id:
                    return self.node(p.spec.node_name), statuses[0].container_id.split("://", 1)[1]
                if time.monotonic() > deadline:
                    raise LabError(f"pod {namespace}/{pod} has no running container")
                time.sleep(0.2)

    def kill_pod(self, namespace: str, pod: str, sig: int = _signal.SIGKILL) -> None:
        """Signal a pod's container through its node's containerd (as an OOM kill or a
        crashing runtime would), bypassing the kubelet and its grace period."""
        node, container_id = self.container(namespace, pod)
        ctr(node.socket, "tasks", "kill", "--signal", _signal.Signals(sig).name, container_id)

    def pod_logs(self, namespace: str, pod: str, previous: bool = False) -> str:
        """The pod's log through the apiserver and kubelet, as `kubectl logs` shows it."""
        args = ["logs", "-n", namespace, pod] + (["--previous"] if previous else [])
        return self.kubectl(*args, check=False).stdout

    @property
    def node_names(self) -> list[str]:
        from kubernetes import client

        with self.api_client() as api:
            return [n.metadata.name for n in client.CoreV1Api(api).list_node().items]


def write_token_kubeconfig(path: Path, server: str, ca_file: Path, user: str, token: str) -> str:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(Path(ca_file).read_bytes()).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": user}}],
    }
    path = Path(path)
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config))
    return str(path)
