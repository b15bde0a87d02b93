"""Fixtures for operator cluster tests: the CRD, the chart's RBAC, and the operator running
as the chart's ServiceAccount (so a missing permission fails a test), plus per-test
namespaces with an S3 credentials Secret and a fresh bucket on the lab's S3 server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from phoenix_lab.procs import free_port

REPO = Path(__file__).resolve().parents[2]
FAKE_TRAINER = str(Path(__file__).with_name("fake_trainer.py"))
OPERATOR_NS = "phoenix-system"
RELEASE = "phx"
SA = f"{RELEASE}-operator"


@pytest.fixture(scope="session")
def crd(lab):
    lab.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "phoenixjobs.yaml"))
    lab.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                "crd/phoenixjobs.phoenix.dev")
    return "phoenixjobs.phoenix.dev"


@pytest.fixture(scope="session")
def operator_rbac(lab, crd):
    """ServiceAccount + ClusterRole/Binding exactly as the chart renders them."""
    lab.kubectl("create", "namespace", OPERATOR_NS, check=False)
    out = lab.helm("template", RELEASE, str(REPO / "charts" / "phoenix"), "-n", OPERATOR_NS,
                   "--skip-crds").stdout
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] in (
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding")]
    lab.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return lab.serviceaccount_kubeconfig(OPERATOR_NS, SA)


class OperatorProcess:
    """The operator as a local process (kopf run), authenticated as the chart's SA."""

    def __init__(self, kubeconfig: str, log_dir: Path, s3_url: str) -> None:
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.s3_url = s3_url
        self.proc: subprocess.Popen | None = None
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        env = dict(os.environ, KUBECONFIG=self.kubeconfig,
                   PHOENIX_METRICS_PORT=str(self.metrics_port),
                   PHOENIX_METRICS_HOST="127.0.0.1", PHOENIX_RESYNC_SECONDS="5")
        log = open(self.log_dir / f"operator-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "-m", "phoenix_operator.main",
             "--standalone", "--all-namespaces",
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
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz",
                                        timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            return r.read().decode()

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

    def log_tail(self, n: int = 60) -> str:
        path = self.log_dir / f"operator-{self.starts}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def operator(lab, operator_rbac, tmp_path_factory):
    op = OperatorProcess(operator_rbac, tmp_path_factory.mktemp("operator"), lab.s3.url)
    op.start()
    yield op
    op.stop()


@pytest.fixture
def core(lab):
    with lab.api_client() as api:
        yield client.CoreV1Api(api)


@pytest.fixture
def custom(lab):
    with lab.api_client() as api:
        yield client.CustomObjectsApi(api)


@pytest.fixture
def ns(lab, core):
    """A fresh namespace with a credentials Secret for the lab's S3 server."""
    name = f"pxj-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_secret(name, client.V1Secret(
        metadata=client.V1ObjectMeta(name="s3-creds"),
        string_data={"AWS_ACCESS_KEY_ID": lab.s3.access_key,
                     "AWS_SECRET_ACCESS_KEY": lab.s3.secret_key}))
    yield name
    core.delete_namespace(name)


@pytest.fixture
def bucket(lab):
    name = f"pxj-{uuid.uuid4().hex[:10]}"
    lab.s3.client().create_bucket(Bucket=name)
    return name
