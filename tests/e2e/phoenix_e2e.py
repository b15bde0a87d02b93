"""What the e2e suite needs to know about the cluster it runs on, and the chart install it
uses on the lab.

The suite talks to the cluster only through a kubeconfig and the Kubernetes API (preemption
is an Eviction, as a spot reclaim or drain does it), so the same tests run on the lab and on
kind. Everything cluster-specific is in `E2ETarget`, built either from PHOENIX_E2E_* env vars
(any cluster with the chart installed) or by `install_chart_on_lab` (the lab).

Env vars for an external cluster (the kind workflow sets all of them):
  PHOENIX_E2E_KUBECONFIG            kubeconfig of the cluster (required; unset: use the lab)
  PHOENIX_E2E_NAMESPACE             where test jobs go (default phoenix-e2e; created if missing)
  PHOENIX_E2E_OPERATOR_NAMESPACE    namespace of the chart release (default phoenix-system)
  PHOENIX_E2E_OPERATOR_RELEASE      release name (default phoenix; Deployment <release>-operator)
  PHOENIX_E2E_S3_ENDPOINT           S3 endpoint as pods reach it (required)
  PHOENIX_E2E_S3_LOCAL_ENDPOINT     S3 endpoint as this test process reaches it (default: same)
  PHOENIX_E2E_S3_ACCESS_KEY / PHOENIX_E2E_S3_SECRET_KEY
  PHOENIX_E2E_TRAINER_IMAGE         trainer image (default phoenix-trainer:dev)
  PHOENIX_E2E_TRAINER_COMMAND       trainer command, shell-split (default below)
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from kube_helpers import http_ok, http_text, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "phoenix"
LAB_VALUES = CHART / "ci" / "lab-values.yaml"
MANIFESTS = Path(__file__).with_name("manifests")
GROUP, VERSION, PLURAL = "phoenix.dev", "v1alpha1", "phoenixjobs"
CREDENTIALS_SECRET = "phoenix-e2e-s3"
# Where the trainer image keeps the example script (trainer_image/Dockerfile).
DEFAULT_TRAINER_COMMAND = "python /app/examples/train_mlp.py"
# Labels every object the chart creates carries; used to prove an uninstall is clean.
OPERATOR_KINDS = ("deployments", "serviceaccounts", "services", "roles", "rolebindings",
                  "clusterroles", "clusterrolebindings", "pods")


@dataclass
class S3Target:
    endpoint: str          # as pods reach it
    local_endpoint: str    # as the test process reaches it
    access_key: str
    secret_key: str

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.local_endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(retries={"max_attempts": 3},
                                          s3={"addressing_style": "path"}))


@dataclass
class E2ETarget:
    """A cluster with the Phoenix chart installed, as the e2e tests see it."""

    kubeconfig: str
    namespace: str
    operator_namespace: str
    operator_release: str
    s3: S3Target
    trainer_image: str
    trainer_command: list[str]
    # How to read the operator's log: kubectl logs on real clusters, a file on the lab.
    operator_log: Callable[[], str] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def operator_deployment(self) -> str:
        return f"{self.operator_release}-operator"

    @classmethod
    def from_env(cls, env=os.environ) -> "E2ETarget":
        missing = [k for k in ("PHOENIX_E2E_KUBECONFIG", "PHOENIX_E2E_S3_ENDPOINT",
                               "PHOENIX_E2E_S3_ACCESS_KEY", "PHOENIX_E2E_S3_SECRET_KEY")
                   if not env.get(k)]
        if missing:
            raise ValueError(f"set {', '.join(missing)} to run the e2e suite on a cluster")
        endpoint = env["PHOENIX_E2E_S3_ENDPOINT"]
        return cls(
            kubeconfig=env["PHOENIX_E2E_KUBECONFIG"],
            namespace=env.get("PHOENIX_E2E_NAMESPACE", "phoenix-e2e"),
            operator_namespace=env.get("PHOENIX_E2E_OPERATOR_NAMESPACE", "phoenix-system"),
            operator_release=env.get("PHOENIX_E2E_OPERATOR_RELEASE", "phoenix"),
            s3=S3Target(endpoint, env.get("PHOENIX_E2E_S3_LOCAL_ENDPOINT") or endpoint,
                        env["PHOENIX_E2E_S3_ACCESS_KEY"], env["PHOENIX_E2E_S3_SECRET_KEY"]),
            trainer_image=env.get("PHOENIX_E2E_TRAINER_IMAGE", "phoenix-trainer:dev"),
            trainer_command=shlex.split(env.get("PHOENIX_E2E_TRAINER_COMMAND")
                                        or DEFAULT_TRAINER_COMMAND),
        )

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([kubectl_binary(), f"--kubeconfig={self.kubeconfig}", *args],
                              capture_output=True, text=True, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def operator_logs(self, tail: int = 80) -> str:
        if self.operator_log is not None:
            text = self.operator_log()
        else:
            text = self.kubectl("-n", self.operator_namespace, "logs",
                                f"deployment/{self.operator_deployment}", f"--tail={tail}",
                                check=False).stdout
        return "\n".join(text.splitlines()[-tail:])

    def evict(self, namespace: str, pod: str) -> None:
        """Preempt a pod the way a spot reclaim or node drain does: the Eviction API."""
        from kubernetes import client

        with self.api_client() as api:
            client.CoreV1Api(api).create_namespaced_pod_eviction(pod, namespace, client.V1Eviction(
                metadata=client.V1ObjectMeta(name=pod, namespace=namespace)))


def kubectl_binary() -> str:
    from shutil import which

    cached = Path(os.environ.get("PHOENIX_CACHE", Path.home() / ".cache" / "phoenix")) / "bin"
    for candidate in (cached / "kubectl", which("kubectl")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise FileNotFoundError("kubectl not found on PATH or in ~/.cache/phoenix/bin")


# --- jobs ----------------------------------------------------------------------------------
def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def sample_job(target: E2ETarget, name: str, bucket: str, *, steps: int = 400,
               step_delay: float = 0.02, checkpoint_every: int = 20, grace: int = 20) -> dict:
    """The example MLP as a one-phase PhoenixJob; slow enough per step that a preemption
    lands mid-run, short enough to finish in well under a minute on a CPU."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "PhoenixJob",
        "metadata": {"name": name, "labels": {"phoenix.dev/e2e": "true"}},
        "spec": {
            "template": {"spec": {"containers": [{
                "name": "trainer", "image": target.trainer_image,
                "command": [*target.trainer_command, f"--steps={steps}",
                            f"--step-delay={step_delay}", f"--checkpoint-every={checkpoint_every}",
                            "--log-every=50"],
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
            }]}},
            "phases": [{"name": "train"}],
            "checkpoint": {"uri": f"s3://{bucket}/{name}", "endpoint": target.s3.endpoint,
                           "credentialsSecret": CREDENTIALS_SECRET, "keep": 3},
            "recovery": {"terminationGracePeriodSeconds": grace, "maxFailures": 2},
        },
    }


def phase_status(job: dict, phase: str = "train") -> dict:
    for p in (job.get("status") or {}).get("phases") or ():
        if p["name"] == phase:
            return p
    return {}


# --- the chart on the lab ------------------------------------------------------------------
@dataclass
class LabRelease:
    """A chart release installed into the lab by `install_chart_on_lab`."""

    lab: Any
    release: str
    namespace: str
    metrics_port: int
    liveness_port: int

    @property
    def deployment(self) -> str:
        return f"{self.release}-operator"

    def operator_pods(self) -> list[dict]:
        out = self.lab.kubectl("-n", self.namespace, "get", "pods", "-o", "yaml", "-l",
                               f"app.kubernetes.io/instance={self.release}").stdout
        return yaml.safe_load(out)["items"]

    def operator_log(self) -> str:
        """The operator pod's stdout, from the lab's pod directory (the lab has no
        `kubectl logs`)."""
        texts = []
        for pod in self.operator_pods():
            meta = pod["metadata"]
            pod_dir = (Path(self.lab.state_dir) / "pods"
                       / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}")
            path = pod_dir / "operator.log"
            if path.exists():
                texts.append(f"--- {path}\n" + path.read_text(errors="replace"))
        return "\n".join(texts) or f"(no operator pod log for release {self.release})"

    def healthy(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.liveness_port}/healthz")

    def metrics(self) -> str:
        return http_text(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def describe(self) -> str:
        pods = self.lab.kubectl("-n", self.namespace, "get", "deploy,rs,pods", "-o", "wide",
                                check=False)
        return f"{pods.stdout}{pods.stderr}\n{self.operator_log()[-4000:]}"

    def uninstall(self, timeout: float = 90) -> None:
        self.lab.helm("uninstall", self.release, "-n", self.namespace, "--wait",
                      f"--timeout={int(timeout)}s", check=False)
        wait_for(lambda: not self.operator_pods(), timeout, 0.5,
                 f"{self.release} operator pods gone", diagnose=self.describe)


def install_chart_on_lab(lab, release: str, namespace: str, *, values: dict | None = None,
                         timeout: float = 120) -> LabRelease:
    """`helm install` the chart with the lab's values on free loopback ports, and wait
    until the operator pod is running and answers /healthz."""
    from phoenix_lab.procs import free_port

    metrics_port, liveness_port = free_port(), free_port()
    lab.kubectl("create", "namespace", namespace, check=False)
    sets = {"operator.metricsPort": metrics_port, "operator.livenessPort": liveness_port,
            "metrics.service.port": metrics_port, **(values or {})}
    args = ["install", release, str(CHART), "-n", namespace, "-f", str(LAB_VALUES)]
    for key, value in sets.items():
        if isinstance(value, (list, tuple)):
            args += ["--set", f"{key}={{{','.join(map(str, value))}}}"]
        else:
            args += ["--set", f"{key}={value}"]
    lab.helm(*args)
    rel = LabRelease(lab, release, namespace, metrics_port, liveness_port)
    wait_for(rel.healthy, timeout, 0.5, f"operator of release {release} answering /healthz",
             diagnose=rel.describe)
    return rel


def python_for_lab() -> str:
    """On the lab `python` in a pod command is the project's venv (the node agent puts it
    first on PATH); this is the same interpreter, for building commands in tests."""
    return sys.executable
