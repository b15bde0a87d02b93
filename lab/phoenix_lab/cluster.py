"""The lab cluster: start, stop and inspect etcd, kube-apiserver, kube-controller-manager,
the node agent and the S3 server as one unit, plus the disruption helpers tests use.

`Lab.up()` is idempotent (running parts are left alone), `Lab.down()` stops everything it
started. All servers bind 127.0.0.1; the service CIDR is configuration only and nothing
ever connects to a cluster IP.
"""
from __future__ import annotations

import base64
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

from . import paths
from .certs import PKI, ensure_pki
from .procs import LabError, Service, free_port, require_free_port, tcp_ready
from .s3 import S3Endpoint, S3Server

K8S_VERSION_PREFIX = "v1.35."
SERVICE_CIDR = "10.96.0.0/16"  # configuration only; never dialled


@dataclass
class LabPorts:
    etcd: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    s3: int

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
        )

    @classmethod
    def ephemeral(cls) -> "LabPorts":
        """Free ports picked now, for test sessions that must not collide with a demo lab."""
        return cls(*(free_port() for _ in range(5)))


Progress = Callable[[str], None]


def _print_progress(msg: str) -> None:
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


class Lab:
    def __init__(self, state_dir: Path | None = None, ports: LabPorts | None = None,
                 progress: Progress = _print_progress) -> None:
        self.state_dir = Path(state_dir or paths.default_state_dir()).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        saved = self.state_dir / "lab.json"
        if saved.exists():
            self.ports = LabPorts(**json.loads(saved.read_text())["ports"])
        else:
            self.ports = ports or LabPorts.fixed()
            saved.write_text(json.dumps({"ports": asdict(self.ports)}, indent=2))
        self.pki = PKI(self.state_dir / "pki")
        self.s3_server = S3Server(self.state_dir / "s3", port=self.ports.s3)

    # ---- paths and clients -------------------------------------------------------------
    @property
    def server_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def kubeconfig(self) -> str:
        return str(self.state_dir / "kubeconfig")

    @property
    def s3(self) -> S3Endpoint:
        return self.s3_server.endpoint

    def _services(self) -> list[Service]:
        return [self._etcd(), self._apiserver(), self._controller_manager(), self._node_agent()]

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
                  "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                  f"--secure-port={self.ports.apiserver}",
                  f"--tls-cert-file={pki.cert('apiserver')}",
                  f"--tls-private-key-file={pki.key('apiserver')}",
                  f"--client-ca-file={pki.ca_cert}",
                  "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                  f"--service-account-key-file={pki.sa_pub}",
                  f"--service-account-signing-key-file={pki.sa_key}",
                  f"--service-cluster-ip-range={SERVICE_CIDR}",
                  "--authorization-mode=RBAC",
                  # Endpoints may not hold loopback addresses; the lab has no kubernetes
                  # Service endpoint, pods reach the apiserver by 127.0.0.1 directly.
                  "--endpoint-reconciler-type=none",
                  "--allow-privileged=true", "--profiling=false",
                  f"--cert-dir={self.state_dir / 'apiserver-certs'}"],
        )

    def _controller_manager(self) -> Service:
        pki = self.pki
        kc = self._write_kubeconfig("controller-manager",
                                    self.state_dir / "controller-manager.kubeconfig")
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
                  f"--service-cluster-ip-range={SERVICE_CIDR}",
                  "--leader-elect=false", "--profiling=false",
                  f"--cert-dir={self.state_dir / 'cm-certs'}"],
        )

    def _node_agent(self) -> Service:
        return Service(
            name="node-agent", state_dir=self.state_dir,
            ready=lambda: (self.state_dir / "run" / "node-agent.ready").exists(),
            argv=[sys.executable, "-m", "phoenix_lab.nodeagent",
                  "--kubeconfig", self.kubeconfig, "--state-dir", str(self.state_dir),
                  "--apiserver-port", str(self.ports.apiserver)],
        )

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
        for name in ("etcd", "kube-apiserver", "kube-controller-manager", "versitygw"):
            paths.binary(name)  # fail early with a clear message if a binary is missing
        ensure_pki(self.pki.dir)
        self._write_kubeconfig("admin", Path(self.kubeconfig))
        port_owner = {
            "etcd": (self.ports.etcd, self.ports.etcd_peer),
            "kube-apiserver": (self.ports.apiserver,),
            "kube-controller-manager": (self.ports.controller_manager,),
        }
        for service in self._services():
            if service.running():
                self.progress(f"{service.name}: already running (pid {service.pid()})")
                continue
            for port in port_owner.get(service.name, ()):
                require_free_port(port, service.name)
            self.progress(f"starting {service.name}")
            service.start(timeout=120)
        if not self.s3_server.running():
            self.progress("starting S3 server (versitygw)")
        self.s3_server.start()
        self.progress(f"lab ready in {time.monotonic() - t0:.1f}s; "
                      f"export KUBECONFIG={self.kubeconfig}")
        return self

    def down(self) -> None:
        self.s3_server.stop()
        for service in reversed(self._services()):
            if service.running():
                self.progress(f"stopping {service.name}")
            service.stop()

    def status(self) -> dict[str, bool]:
        result = {s.name: s.running() for s in self._services()}
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

    def lose_node(self, node: str) -> None:
        """Simulate losing a node: its Node object goes away and its processes die at once.

        The node agent notices, SIGKILLs what ran there, and registers a replacement node;
        the controller-manager's pod GC then cleans up the orphaned pods.
        """
        from kubernetes import client

        with self.api_client() as api:
            client.CoreV1Api(api).delete_node(node)

    def kill_pod(self, namespace: str, pod: str, sig: int = _signal.SIGKILL) -> None:
        """Send a signal to a running pod's process group, as the node's runtime would."""
        pidfile = self.pod_dir(namespace, pod) / "pid"
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError) as e:
            raise LabError(f"pod {namespace}/{pod} has no running process on the lab") from e
        os.killpg(pid, sig)

    def pod_dir(self, namespace: str, pod: str) -> Path:
        """Where the node agent keeps a pod's logs, pid and termination messages."""
        matches = sorted((self.state_dir / "pods").glob(f"{namespace}_{pod}_*"),
                         key=lambda p: p.stat().st_mtime)
        if not matches:
            raise LabError(f"pod {namespace}/{pod} never ran on the lab")
        return matches[-1]

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
