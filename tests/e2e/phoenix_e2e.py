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
  PHOENIX_E2E_OPERATOR_RELEASE      release name (default phoenix; Deployment and Lease
                                    <release>-operator)
  PHOENIX_E2E_S3_ENDPOINT           S3 endpoint as pods reach it (required)
  PHOENIX_E2E_S3_LOCAL_ENDPOINT     S3 endpoint as this test process reaches it (default: same)
  PHOENIX_E2E_S3_ACCESS_KEY / PHOENIX_E2E_S3_SECRET_KEY
  PHOENIX_E2E_TRAINER_IMAGE         trainer image (default phoenix-trainer:dev)
  PHOENIX_E2E_TRAINER_COMMAND       trainer command, shell-split (default below)
  PHOENIX_E2E_IMAGE_PULL_POLICY     the trainer's imagePullPolicy (default IfNotPresent)

Trainer pods are written as users must write them for a namespace that enforces the
"restricted" Pod Security Standard (the lab enforces it everywhere): non-root, read-only
root filesystem, no privilege escalation, all capabilities dropped, RuntimeDefault seccomp,
a writable /tmp only as an emptyDir.

The chart runs several operator replicas; one leads (`Operators`): the pod named by
`spec.holderIdentity` of the Lease the operator keeps under the Deployment's name. "The
operator's" log, metrics and /healthz are the leader's; ready means every replica Ready.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from phoenix_operator.podspec import pod_name

from kube_helpers import RESTRICTED_CONTAINER, TMP_MOUNT, TMP_VOLUME, http_ok, http_text, wait_for

MANIFESTS = Path(__file__).with_name("manifests")
GROUP, VERSION, PLURAL = "phoenix.dev", "v1alpha1", "phoenixjobs"
CREDENTIALS_SECRET = "phoenix-e2e-s3"
# Where the trainer image keeps the example script (trainer_image/Dockerfile).
DEFAULT_TRAINER_COMMAND = "python /app/examples/train_mlp.py"
# Labels every object the chart creates carries; used to prove an uninstall is clean.
OPERATOR_KINDS = ("deployments", "serviceaccounts", "services", "roles", "rolebindings",
                  "clusterroles", "clusterrolebindings", "poddisruptionbudgets", "pods")
# Waiting reasons of a container that will not start or keeps dying.
BROKEN_WAITING = {"CrashLoopBackOff", "ErrImageNeverPull", "ErrImagePull", "ImagePullBackOff",
                  "CreateContainerConfigError", "CreateContainerError", "InvalidImageName",
                  "RunContainerError"}


@dataclass
class S3Target:
    endpoint: str          # as pods reach it
    local_endpoint: str    # as the test process reaches it
    access_key: str
    secret_key: str
    name: str = "external"  # which server (a test's id says it): versitygw, seaweedfs on the lab
    # An https endpoint signed by a private CA: its PEM here (for this process) and the
    # ConfigMap in the jobs' namespace holding it as ca.crt (spec.checkpoint.caBundle).
    ca_bundle: str | None = None
    ca_configmap: str | None = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.local_endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(retries={"max_attempts": 3},
                                          s3={"addressing_style": "path"}),
                            verify=self.ca_bundle)

    def checkpoint_tls(self) -> dict:
        """What a PhoenixJob's spec.checkpoint needs to trust this endpoint: {} or its
        caBundle."""
        return {"caBundle": {"configMap": self.ca_configmap}} if self.ca_configmap else {}


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
    image_pull_policy: str = "IfNotPresent"
    extra: dict = field(default_factory=dict)

    @property
    def operators(self) -> "Operators":
        return Operators(self.kubectl, self.operator_namespace, self.operator_release)

    @property
    def operator_deployment(self) -> str:
        return self.operators.deployment

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
            image_pull_policy=env.get("PHOENIX_E2E_IMAGE_PULL_POLICY", "IfNotPresent"),
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
        """The last `tail` lines of every replica's log: the leader's (see Operators.logs)."""
        return "\n".join(self.operators.logs().splitlines()[-tail:])

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
            "template": {"spec": {"volumes": [TMP_VOLUME], "containers": [{
                "name": "trainer", "image": target.trainer_image,
                "imagePullPolicy": target.image_pull_policy,
                "command": [*target.trainer_command, f"--steps={steps}",
                            f"--step-delay={step_delay}", f"--checkpoint-every={checkpoint_every}",
                            "--log-every=50"],
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                "securityContext": RESTRICTED_CONTAINER, "volumeMounts": [TMP_MOUNT],
            }]}},
            "phases": [{"name": "train"}],
            "checkpoint": {"uri": f"s3://{bucket}/{name}", "endpoint": target.s3.endpoint,
                           "credentialsSecret": CREDENTIALS_SECRET, "keep": 3,
                           **target.s3.checkpoint_tls()},
            "recovery": {"terminationGracePeriodSeconds": grace, "maxFailures": 2},
        },
    }


def phase_status(job: dict, phase: str = "train") -> dict:
    for p in (job.get("status") or {}).get("phases") or ():
        if p["name"] == phase:
            return p
    return {}


def evict_first_attempt_and_finish(target: E2ETarget, kube, bucket: str, name: str) -> dict:
    """The sample job's story (``kube``: conftest's clients): attempt 1 running with a first
    checkpoint in S3, evicted, the job run to its end. Returns the finished job, asserted
    Succeeded after at least one preemption and no failure."""
    def job() -> dict:
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, target.namespace, PLURAL, name)

    def diagnose() -> str:
        return f"job status: {job().get('status')}\noperator log:\n{target.operator_logs()}"

    def phase_of(pod: str) -> str | None:
        pods = kube.core.list_namespaced_pod(target.namespace, field_selector=f"metadata.name={pod}")
        return pods.items[0].status.phase if pods.items else None

    first = pod_name(name, "train", 1)
    wait_for(lambda: phase_of(first) == "Running", 180, 0.5, f"{first} running", diagnose=diagnose)
    wait_for(lambda: manifests(target, bucket, f"{name}/"), 180, 0.5, "a first checkpoint in S3",
             diagnose=diagnose)
    target.evict(target.namespace, first)
    done = wait_for(lambda: (j := job()) and (j.get("status") or {}).get("phase")
                    in ("Succeeded", "Failed") and j, 420, 2, "job finished", diagnose=diagnose)
    assert done["status"]["phase"] == "Succeeded", diagnose()
    ps = phase_status(done)
    assert ps["preemptions"] >= 1 and ps["failures"] == 0 and ps["attempts"] >= 2, ps
    return done


def manifests(target: E2ETarget, bucket: str, prefix: str) -> list[str]:
    """The committed checkpoints' manifest keys under ``prefix``."""
    out = target.s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in out.get("Contents", ()) if o["Key"].endswith("/manifest.json")]


def resume_startup(target: E2ETarget, bucket: str, name: str, attempt: int = 2) -> dict:
    """Where a resumed attempt's start-up went (its metrics' ``resume`` record), asserted to
    have been prefetched while the script imported torch."""
    body = target.s3.client().get_object(Bucket=bucket, Key=f"{name}/train/metrics/attempt-{attempt}.jsonl")
    resumed = next(r for r in map(json.loads, body["Body"].read().decode().splitlines())
                   if r["event"] == "resume")
    startup = resumed["startup"]
    assert startup["prefetch"]["bytes"] > 0 and "error" not in startup["prefetch"], startup
    return startup


# --- the upgrade test's previous release ---------------------------------------------------
UPGRADE_FROM = Path(__file__).with_name("upgrade-from")


def upgrade_from(repo: Path) -> str | None:
    """The full commit id tests/e2e/upgrade-from names (its one line that is not a comment),
    or None where `repo` is a shallow clone that lacks it. A full clone without it fails: the
    file names a commit that never landed."""
    lines = [line.split("#", 1)[0].strip() for line in UPGRADE_FROM.read_text().splitlines()]
    (rev,) = [line for line in lines if line]
    got = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet",
                          f"{rev}^{{commit}}"], capture_output=True, text=True)
    if got.returncode == 0:
        return got.stdout.strip()
    shallow = subprocess.run(["git", "-C", str(repo), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True).stdout.strip()
    assert shallow == "true", f"tests/e2e/upgrade-from names {rev[:12]}, which {repo} lacks"
    return None


# --- the operator pod ----------------------------------------------------------------------
def pod_ready(pod: dict) -> bool:
    """Running, Ready, every container running and ready."""
    status = pod.get("status") or {}
    statuses = status.get("containerStatuses") or ()
    return (status.get("phase") == "Running" and bool(statuses)
            and any(c["type"] == "Ready" and c["status"] == "True"
                    for c in status.get("conditions") or ())
            and all(cs.get("ready") and "running" in (cs.get("state") or {}) for cs in statuses))


def restarts(pod: dict) -> int:
    return sum(cs.get("restartCount", 0)
               for cs in (pod.get("status") or {}).get("containerStatuses") or ())


def broken_reason(pod: dict) -> str | None:
    """Why a pod's container will not run by itself (crash loop, missing image, bad
    config), or None."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
        if reason in BROKEN_WAITING:
            return f"container {cs['name']}: {reason} (last state {json.dumps(cs.get('lastState'))})"
    return None


def restricted_violations(pod: dict) -> list[str]:
    """What in a pod's spec falls short of the restricted Pod Security Standard (plus the
    chart's read-only root filesystem). Container settings override the pod's."""
    spec = pod["spec"]
    psc = spec.get("securityContext") or {}
    out = []
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp!r}")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or ()):
            out.append(f"{name}: capabilities do not drop ALL")
        if set((sc.get("capabilities") or {}).get("add") or ()) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {sc['capabilities']['add']}")
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: root filesystem is writable")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"pod: {key}")
    if any("hostPath" in v for v in spec.get("volumes") or ()):
        out.append("pod: hostPath volume")
    return out


def restricted_admission_warnings(target: E2ETarget, namespace: str) -> str:
    """What the apiserver's PodSecurity admission says about the pods already in
    `namespace` if it enforced "restricted" there (a server-side dry run: nothing changes).
    Empty when every pod complies. The version is pinned to the server's own: admission
    skips the check when the policy would not change, and the lab's default is already
    restricted:latest."""
    server = json.loads(target.kubectl("version", "-o", "json").stdout)["serverVersion"]
    version = f"v{server['major']}.{server['minor'].rstrip('+')}"
    out = target.kubectl("label", "--dry-run=server", "--overwrite", "namespace", namespace,
                         "pod-security.kubernetes.io/enforce=restricted",
                         f"pod-security.kubernetes.io/enforce-version={version}")
    return "\n".join(line for line in out.stderr.splitlines() if line.startswith("Warning"))


def check_operator_pods(target: E2ETarget, *, ready_timeout: float = 180,
                        steady_seconds: float = 20) -> dict:
    """Every operator replica runs under the restricted Pod Security Standard, becomes Ready
    (its readiness probe is kopf's /healthz) and stays Ready without a restart for
    `steady_seconds`; one of them leads. A crash-looping operator fails here: it never turns
    Ready, or it restarts within the window. Returns the leader's pod."""
    operators = target.operators
    pods = wait_for(operators.all_ready, ready_timeout, 1, "every operator replica Running and Ready",
                    diagnose=operators.describe)
    for pod in pods:
        assert restricted_violations(pod) == [], (pod["metadata"]["name"],
                                                  restricted_violations(pod), operators.describe())
    warnings = restricted_admission_warnings(target, target.operator_namespace)
    assert not warnings, f"PodSecurity admission: {warnings}"
    before = {p["metadata"]["uid"]: (p["metadata"]["name"], restarts(p)) for p in pods}
    deadline = time.monotonic() + steady_seconds
    while time.monotonic() < deadline:
        time.sleep(2)
        now = {p["metadata"]["uid"]: p for p in operators.pods()}
        for uid, (name, count) in before.items():
            assert uid in now, f"operator pod {name} went away\n{operators.describe()}"
            assert restarts(now[uid]) == count and pod_ready(now[uid]), (
                f"operator pod {name} restarted or lost readiness (restarts {count} -> "
                f"{restarts(now[uid])}; {broken_reason(now[uid])})\n{operators.describe()}")
    return operators.wait_leader()


@dataclass(frozen=True)
class Operators:
    """A chart release's operator replicas, read as on any cluster (kubectl only): the pods
    with the chart's selector labels, and among them the leader, the pod whose name is the
    `spec.holderIdentity` of the Lease the operator creates under the Deployment's name in
    the release namespace (the chart passes PHOENIX_LEASE_NAME, PHOENIX_POD_NAME)."""

    kubectl: Callable[..., subprocess.CompletedProcess]  # E2ETarget.kubectl or Lab.kubectl
    namespace: str
    release: str

    @property
    def deployment(self) -> str:
        """The Deployment's name, which the Lease shares (the chart's fullname)."""
        return f"{self.release}-operator"

    def pods(self, *, terminating: bool = False) -> list[dict]:
        """The release's operator pods by name; those being deleted only with `terminating`."""
        out = self.kubectl("-n", self.namespace, "get", "pods", "-o", "json", "-l",
                           f"app.kubernetes.io/name=phoenix,app.kubernetes.io/instance={self.release}")
        pods = sorted(json.loads(out.stdout)["items"], key=lambda p: p["metadata"]["name"])
        return [p for p in pods if terminating or not p["metadata"].get("deletionTimestamp")]

    def holder(self) -> str | None:
        """The Lease's holderIdentity; None while the Lease is missing or held by nobody."""
        out = self.kubectl("-n", self.namespace, "get", "lease", self.deployment, "-o", "json",
                           check=False)
        if out.returncode != 0:
            if "NotFound" in out.stderr:
                return None
            raise AssertionError(f"reading Lease {self.namespace}/{self.deployment}: "
                                 f"{out.stderr.strip()}")
        return (json.loads(out.stdout).get("spec") or {}).get("holderIdentity") or None

    def leader(self) -> dict | None:
        """The running, not deleted pod the Lease names; None while there is none (no
        holder yet, or a holder that is gone and whose lease has not yet run out)."""
        holder = self.holder()
        return next((p for p in self.pods() if p["metadata"]["name"] == holder
                     and (p.get("status") or {}).get("phase") == "Running"), None)

    def wait_leader(self, timeout: float = 60, diagnose: Callable[[], str] | None = None) -> dict:
        return wait_for(self.leader, timeout, 0.5,
                        f"a leader: Lease {self.namespace}/{self.deployment} naming a running "
                        f"operator pod in spec.holderIdentity (the operator creates the Lease; "
                        f"still missing or unheld means no replica won the election, or the "
                        f"release runs with leaderElection.enabled=false)",
                        diagnose=diagnose or self.describe)

    def all_ready(self) -> list[dict] | None:
        """The pods, once there are as many as the Deployment asks for and every one is
        Ready; None until then."""
        dep = json.loads(self.kubectl("-n", self.namespace, "get", "deployment", self.deployment,
                                      "-o", "json").stdout)
        pods = self.pods()
        want = dep["spec"].get("replicas", 1)
        return pods if len(pods) == want and all(map(pod_ready, pods)) else None

    def logs(self) -> str:
        """Every replica's log (`kubectl logs`), the previous container's first where one
        restarted (e.g. after an operator-kill), the leader's last, so that a tail of it is
        the leader's."""
        try:
            leader = self.holder()
        except AssertionError:
            leader = None
        texts = []
        for pod in sorted(self.pods(terminating=True), key=lambda p: p["metadata"]["name"] == leader):
            name = pod["metadata"]["name"]
            role = " (leader)" if name == leader else ""
            if restarts(pod):
                texts.append(f"--- {name}{role} (previous container)\n"
                             + self._log(name, "--previous"))
            texts.append(f"--- {name}{role}\n" + self._log(name))
        return "\n".join(texts) or f"(no operator pod for release {self.release})"

    def _log(self, pod: str, *flags: str) -> str:
        return self.kubectl("-n", self.namespace, "logs", pod, *flags, check=False).stdout

    def describe(self) -> str:
        """For failure messages: the Deployment, pods, PDB and Lease, recent events, logs."""
        out = self.kubectl("-n", self.namespace, "get", "deploy,rs,pods,pdb,lease", "-o", "wide",
                           check=False)
        events = self.kubectl("-n", self.namespace, "get", "events", "--sort-by=.lastTimestamp",
                              check=False)
        return f"{out.stdout}{out.stderr}\n{events.stdout[-3000:]}\n{self.logs()[-4000:]}"


# --- the chart on the lab ------------------------------------------------------------------
@dataclass
class LabRelease:
    """A chart release installed into the lab by `install_chart_on_lab`. Everything about
    the running operators is read as on any cluster (`Operators`): the pods' status, the
    Lease, `kubectl logs`, and the leader's endpoints at its pod IP (the lab's host routes
    to the nodes' pod bridges)."""

    lab: Any
    release: str
    namespace: str

    @property
    def operators(self) -> Operators:
        return Operators(self.lab.kubectl, self.namespace, self.release)

    def leader_pod(self, timeout: float = 60) -> dict:
        """The leading operator's pod, waited for while the Lease names none."""
        return self.operators.wait_leader(timeout, diagnose=self.describe)

    def operator_log(self) -> str:
        return self.operators.logs()

    def healthy(self) -> bool:
        """kopf's /healthz answers 200 at the leader's pod IP."""
        leader = self.operators.leader()
        try:
            return leader is not None and http_ok(_endpoint(leader, "health", "/healthz"))
        except (AssertionError, KeyError, StopIteration):
            return False

    def metrics(self) -> str:
        """The leader's /metrics."""
        return http_text(_endpoint(self.leader_pod(), "metrics", "/metrics"))

    def check_not_broken(self) -> bool:
        """Raise if an operator container restarted or is stuck; True otherwise."""
        for pod in self.operators.pods(terminating=True):
            problem = broken_reason(pod) or (f"{restarts(pod)} restart(s)" if restarts(pod) else None)
            if problem:
                raise AssertionError(f"operator pod {pod['metadata']['name']} of release "
                                     f"{self.release} is broken: {problem}\n{self.describe()}")
        return True

    def ready(self) -> bool:
        """No replica broken, and every one Ready."""
        return self.check_not_broken() and self.operators.all_ready() is not None

    def describe(self) -> str:
        return self.operators.describe()

    def uninstall(self, timeout: float = 90) -> None:
        self.lab.helm("uninstall", self.release, "-n", self.namespace, "--wait",
                      f"--timeout={int(timeout)}s", check=False)
        wait_for(lambda: not self.operators.pods(terminating=True), timeout, 0.5,
                 f"{self.release} operator pods gone", diagnose=self.describe)


def _endpoint(pod: dict, port_name: str, path: str) -> str:
    """URL of a pod's named container port."""
    port = next(p["containerPort"] for c in pod["spec"]["containers"]
                for p in c.get("ports") or () if p.get("name") == port_name)
    return f"http://{pod['status']['podIP']}:{port}{path}"


# The lab CA as a ConfigMap (key ca.crt): in a release's namespace for its operators
# (storage.caBundle), in a job namespace for its trainers (spec.checkpoint.caBundle).
LAB_CA_CONFIGMAP = "phoenix-lab-ca"


def apply_ca_configmap(kubectl: Callable[..., subprocess.CompletedProcess], namespace: str,
                       pem_file: str) -> None:
    """``LAB_CA_CONFIGMAP`` in ``namespace`` (created if missing) holding ``pem_file``."""
    kubectl("create", "namespace", namespace, check=False)
    ca = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": LAB_CA_CONFIGMAP, "namespace": namespace},
          "data": {"ca.crt": Path(pem_file).read_text()}}
    kubectl("apply", "-f", "-", input=json.dumps(ca))


def lab_ca_values(lab, namespace: str) -> dict:
    """Chart values that make a release in ``namespace`` trust the lab CA, which signed the
    lab's SeaweedFS (``Lab.s3_server_for``); plain-HTTP versitygw does not care. Puts the
    CA's ConfigMap there first: the operator pod mounts it."""
    apply_ca_configmap(lab.kubectl, namespace, str(lab.pki.ca_cert))
    return {"storage": {"caBundle": {"configMap": LAB_CA_CONFIGMAP, "key": "ca.crt"}}}


def install_chart_on_lab(lab, release: str, namespace: str, *, values: dict | None = None,
                         timeout: float = 180) -> LabRelease:
    """`helm install` the chart with the lab's values (phoenix_lab.install) and `values`,
    then wait until every operator replica is Ready, one leads, and /healthz answers at the
    leader's IP. Not `helm --wait`: an operator that crashes fails here at its first
    restart, with its logs, instead of after the whole timeout."""
    from phoenix_lab.install import helm_install_args
    from phoenix_lab.procs import LabError

    lab.helm(*helm_install_args(lab, release, namespace, values, upgrade=False))
    rel = LabRelease(lab, release, namespace)
    wait_for(rel.ready, timeout, 0.5, f"every operator replica of release {release} Ready",
             diagnose=rel.describe, retry_on=(LabError,))
    rel.leader_pod()
    wait_for(rel.healthy, 30, 0.5,
             f"the leading operator of release {release} answering /healthz at its pod IP",
             diagnose=rel.describe)
    return rel
