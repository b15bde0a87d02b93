"""The operator as a local process (``kopf run``), for cluster tests: started, killed and
restarted by the tests, authenticated by whatever kubeconfig they give it (the chart's
ServiceAccount in conftest). A plain module, so tests import it by name, not via conftest."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kube_helpers import http_ok, http_text
from phoenix_lab.procs import free_port

# The chart's release the cluster tests render RBAC from (conftest), and its namespace.
OPERATOR_NS = "phoenix-system"
RELEASE = "phx"
FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
# The fake trainer reaches trainer pods as a ConfigMap mounted at /opt/fake.
FAKE_TRAINER_CONFIGMAP = "phoenix-fake-trainer"
FAKE_TRAINER_PATH = "/opt/fake/fake_trainer.py"


class OperatorProcess:
    """The operator as a local process (kopf run), authenticated as the chart's SA."""

    def __init__(self, kubeconfig: str, log_dir: Path, s3_url: str, *,
                 namespaces: str = "pxj-*", env: dict[str, str] | None = None,
                 name: str = "operator") -> None:
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.s3_url = s3_url
        self.namespaces = namespaces  # kopf's --namespace pattern
        self.env = env or {}
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        env = dict(os.environ, KUBECONFIG=self.kubeconfig,
                   PHOENIX_METRICS_PORT=str(self.metrics_port),
                   PHOENIX_METRICS_HOST="127.0.0.1", PHOENIX_RESYNC_SECONDS="5", **self.env)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            # Only the cluster tests' own namespaces (pxj-*): the e2e suite shares the
            # session's lab and runs the chart's operator, which must be alone there.
            [sys.executable, "-m", "kopf", "run", "-m", "phoenix_operator.main",
             "--standalone", f"--namespace={self.namespaces}",
             f"--liveness=http://127.0.0.1:{self.health_port}/healthz"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited: see {log.name}\n" + self.log_tail())
            if self.healthy():
                return
            time.sleep(0.2)
        raise RuntimeError("operator did not become healthy in 60s\n" + self.log_tail())

    def healthy(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.health_port}/healthz")

    def metrics(self) -> str:
        return http_text(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a node crash or OOM would do it."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the operator's process group (SIGSTOP/SIGCONT: a partition's
        stand-in, the process neither renews nor writes while stopped)."""
        os.killpg(self.proc.pid, sig)

    def log_tail(self, n: int = 60) -> str:
        path = self.log_path
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
