"""Small helpers for tests that talk to a real apiserver: polling with a deadline (used by
tests/cluster, tests/e2e and the lab tests alike), throwaway pods whose command is a Python
one-liner (in the trainer image, under restricted Pod Security), a beacon pods report to,
a watch for pod states a poller can miss, and probes of the operator's health/metrics
endpoints."""
from __future__ import annotations

import socket
import threading
import time
import urllib.request
import uuid
from typing import Callable, TypeVar

# The "restricted" Pod Security container settings (plus a read-only root) and the writable
# /tmp such a container needs: one definition, the lab samples', re-exported for tests.
from phoenix_lab.samples import RESTRICTED_CONTAINER, TMP_MOUNT, TMP_VOLUME  # noqa: F401

T = TypeVar("T")


def wait_for(fn: Callable[[], T], timeout: float = 60, interval: float = 0.25,
             what: str = "condition", *, diagnose: Callable[[], str] | None = None,
             retry_on: tuple[type[BaseException], ...] = (Exception,)) -> T:
    """Call `fn` until it returns something truthy and return that; fail with `what` after
    `timeout` seconds, adding the last error and whatever `diagnose()` says (operator logs,
    job status). Errors of the types in `retry_on` (default: any, e.g. a transient API
    error) are polled through; anything else fails at once. The one poller of the suite."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
        except retry_on as e:
            last_error = e
        time.sleep(interval)
    extra = f" (last error: {last_error})" if last_error else ""
    if diagnose is not None:
        try:
            extra += "\n" + diagnose()
        except Exception as e:  # noqa: BLE001 - diagnostics must not hide the real failure
            extra += f"\n(diagnostics failed: {e})"
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")


def python_pod(name: str, code: str, *, image: str, grace: int | None = None, labels=None,
               owner=None, node_selector=None, tolerations=None, env=None) -> dict:
    """A Pod manifest that runs `python -c code` in `image` (restartPolicy Never), with the
    restricted securityContext the lab's Pod Security admission enforces."""
    spec = {"restartPolicy": "Never", "volumes": [TMP_VOLUME],
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                            "command": ["python", "-c", code], "env": env or [],
                            "securityContext": RESTRICTED_CONTAINER,
                            "volumeMounts": [TMP_MOUNT]}]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    if node_selector:
        spec["nodeSelector"] = node_selector
    if tolerations:
        spec["tolerations"] = tolerations
    meta = {"name": name, "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def watch_pod(core, namespace: str, name: str, since: str, pred: Callable[[object], bool],
              timeout: float = 60, what: str = "pod state"):
    """Follow one pod's watch events from resourceVersion `since` (read before the action
    under test, so nothing is missed) until `pred(pod)` holds; return that pod object.

    For states a poller can miss: an evicted or deleted pod's object disappears right after
    its container ends, but its watch still shows the final status (the DELETED event
    carries the last state too)."""
    from kubernetes import watch

    seen = []
    w = watch.Watch()
    for event in w.stream(core.list_namespaced_pod, namespace,
                          field_selector=f"metadata.name={name}", resource_version=since,
                          timeout_seconds=max(1, int(timeout))):
        pod = event["object"]
        seen.append(f"{event['type']} phase={pod.status.phase}")
        if pred(pod):
            w.stop()
            return pod
        if event["type"] == "DELETED":
            break
    raise AssertionError(f"{what} of pod {namespace}/{name} never seen within {timeout}s "
                         f"(events: {', '.join(seen) or 'none'})")


def terminated_state(pod):
    """The first container's terminated state, or None while it runs."""
    statuses = pod.status.container_statuses or []
    return statuses[0].state.terminated if statuses and statuses[0].state else None


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def create_namespace(core, prefix: str) -> str:
    """A fresh ``<prefix>-xxxxxx`` namespace, returned once pods can be admitted to it (the
    controller-manager has made its default ServiceAccount)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    name = unique(prefix)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(lambda: core.read_namespaced_service_account("default", name), 60, 0.2,
             f"default ServiceAccount in {name}", retry_on=(ApiException,))
    return name


class Beacon:
    """A TCP listener on the lab's host address that pods report to (`BEACON_CODE`), so a
    test sees what happened inside a container even after its pod is gone."""

    def __init__(self, host: str) -> None:
        self.messages: list[str] = []
        self._sock = socket.create_server((host, 0))
        self.host, self.port = host, self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                self.messages.append(data.decode(errors="replace"))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def saw(self, message: str) -> bool:
        return message in self.messages

    def code(self) -> str:
        """Python source defining `beacon(msg)` that reports to this listener."""
        return (f"import socket\n"
                f"def beacon(msg):\n"
                f"    with socket.create_connection(({self.host!r}, {self.port}), timeout=5) as s:\n"
                f"        s.sendall(msg.encode())\n")

    def close(self) -> None:
        self._sock.close()


def http_ok(url: str) -> bool:
    """Whether a loopback health endpoint answers 200 (operator liveness probes)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()
