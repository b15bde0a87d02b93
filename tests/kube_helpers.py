"""Small helpers for tests that talk to a real apiserver: polling with a deadline (used by
tests/cluster, tests/e2e and the lab tests alike), throwaway pods whose command is a Python
one-liner, and probes of the operator's loopback health/metrics endpoints."""
from __future__ import annotations

import sys
import time
import urllib.request
import uuid
from typing import Callable, TypeVar

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


def python_pod(name: str, code: str, *, grace: int | None = None, labels=None,
               owner=None, node_selector=None, tolerations=None, env=None) -> dict:
    """A Pod manifest that runs `python -c code` on the lab (restartPolicy Never)."""
    spec = {"restartPolicy": "Never",
            "containers": [{"name": "main", "image": "python:3.11-slim",
                            "command": ["python", "-c", code], "env": env or []}]}
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


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


PYTHON = sys.executable


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
