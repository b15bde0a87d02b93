"""The Helm chart installed into the lab as a user installs it: the operator image runs as a
pod on a real node, as the chart's ServiceAccount, under restricted Pod Security. A plain
module (tests import it by name).

Everything about the running operator is read the way one reads it on any cluster: its
pod's status (ready, restarts), `kubectl logs`, and its endpoints through the apiserver's
proxy (metrics via the chart's Service, health via the pod), never from host files or
loopback ports.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from kube_helpers import wait_for
from phoenix_lab.install import helm_install_args
from phoenix_lab.procs import LabError

# Waiting reasons of a container that will not start or keeps dying.
BROKEN_WAITING = {"CrashLoopBackOff", "ErrImageNeverPull", "ErrImagePull", "ImagePullBackOff",
                  "CreateContainerConfigError", "CreateContainerError", "InvalidImageName",
                  "RunContainerError"}


class OperatorPodBroken(AssertionError):
    """The operator pod crashed, restarted or cannot start: fail at once, with its logs."""


@dataclass
class ChartRelease:
    lab: object
    release: str
    namespace: str

    @property
    def deployment(self) -> str:
        return f"{self.release}-operator"

    def operator_pods(self) -> list[dict]:
        out = self.lab.kubectl("-n", self.namespace, "get", "pods", "-o", "json", "-l",
                               f"app.kubernetes.io/instance={self.release}")
        return json.loads(out.stdout)["items"]

    def operator_pod(self) -> dict:
        pods = [p for p in self.operator_pods() if not p["metadata"].get("deletionTimestamp")]
        assert len(pods) == 1, f"expected one operator pod, got {[p['metadata']['name'] for p in pods]}"
        return pods[0]

    def operator_log(self) -> str:
        """The operator container's log (`kubectl logs`), with the previous run's if the
        container restarted."""
        texts = []
        for pod in self.operator_pods():
            name = pod["metadata"]["name"]
            if _restarts(pod):
                texts.append(f"--- {name} (previous)\n"
                             + self.lab.pod_logs(self.namespace, name, previous=True))
            texts.append(f"--- {name}\n" + self.lab.pod_logs(self.namespace, name))
        return "\n".join(texts) or f"(no operator pod for release {self.release})"

    def _proxy(self, path: str) -> str:
        return self.lab.kubectl("get", "--raw", path, timeout=30).stdout

    def metrics(self) -> str:
        """/metrics through the chart's metrics Service (apiserver service proxy)."""
        return self._proxy(f"/api/v1/namespaces/{self.namespace}/services/"
                           f"{self.deployment}-metrics:metrics/proxy/metrics")

    def healthz(self) -> str:
        """kopf's /healthz on the operator pod's health port (apiserver pod proxy)."""
        pod = self.operator_pod()
        # The pod proxy takes a port number (only the Service proxy resolves names).
        port = next(p["containerPort"] for c in pod["spec"]["containers"]
                    for p in c.get("ports") or () if p.get("name") == "health")
        return self._proxy(f"/api/v1/namespaces/{self.namespace}/pods/"
                           f"{pod['metadata']['name']}:{port}/proxy/healthz")

    def check_not_broken(self) -> None:
        """Raise OperatorPodBroken if any operator container restarted, exited or is stuck
        in a state it will not leave by itself."""
        for pod in self.operator_pods():
            for cs in (pod.get("status") or {}).get("containerStatuses") or ():
                state = cs.get("state") or {}
                reason = (state.get("waiting") or {}).get("reason")
                if cs.get("restartCount", 0) or "terminated" in state or reason in BROKEN_WAITING:
                    raise OperatorPodBroken(
                        f"operator pod {pod['metadata']['name']} is not healthy "
                        f"(restarts {cs.get('restartCount', 0)}, state {json.dumps(state)}, "
                        f"last state {json.dumps(cs.get('lastState') or {})})\n"
                        + self.operator_log()[-4000:])

    def ready(self) -> bool:
        self.check_not_broken()
        pods = self.operator_pods()
        return bool(pods) and all(
            any(c["type"] == "Ready" and c["status"] == "True"
                for c in (p.get("status") or {}).get("conditions") or ()) for p in pods)

    def describe(self) -> str:
        out = self.lab.kubectl("-n", self.namespace, "get", "deploy,rs,pods", "-o", "wide",
                               check=False)
        events = self.lab.kubectl("-n", self.namespace, "get", "events",
                                  "--sort-by=.lastTimestamp", check=False)
        return (f"{out.stdout}{out.stderr}\n{events.stdout[-3000:]}\n"
                f"{self.operator_log()[-4000:]}")

    def uninstall(self, timeout: float = 90) -> None:
        self.lab.helm("uninstall", self.release, "-n", self.namespace, "--wait",
                      f"--timeout={int(timeout)}s", check=False)
        wait_for(lambda: not self.operator_pods(), timeout, 0.5,
                 f"{self.release} operator pods gone", diagnose=self.describe)


def install_chart(lab, release: str, namespace: str, values: dict | None = None,
                  timeout: float = 180) -> ChartRelease:
    """`helm install` with the lab's values (phoenix_lab.install), then wait until the
    operator pod is Ready. Not `helm --wait`: a crash-looping operator fails here at its
    first restart, with its logs, instead of after the whole timeout."""
    lab.helm(*helm_install_args(lab, release, namespace, values, upgrade=False))
    rel = ChartRelease(lab, release, namespace)
    wait_for(rel.ready, timeout, 0.5, f"operator pod of release {release} Ready",
             diagnose=rel.describe, retry_on=(LabError,))
    return rel


def _restarts(pod: dict) -> int:
    return sum(cs.get("restartCount", 0)
               for cs in (pod.get("status") or {}).get("containerStatuses") or ())
