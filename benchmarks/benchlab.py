"""What the lab benchmarks share: the operator as a host process authenticated as the chart's
ServiceAccount (so its RSS can be read from /proc), its metrics, and reading /proc."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

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


class Operator:
    """``kopf run -m phoenix_operator.main --all-namespaces`` as a host process."""

    def __init__(self, kubeconfig: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "-m", "phoenix_operator.main", "--standalone",
             "--all-namespaces", "--quiet",
             f"--liveness=http://127.0.0.1:{self.health_port}/healthz"],
            env=dict(os.environ, KUBECONFIG=kubeconfig, PHOENIX_METRICS_HOST="127.0.0.1",
                     PHOENIX_METRICS_PORT=str(self.metrics_port), **(env or {})),
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
