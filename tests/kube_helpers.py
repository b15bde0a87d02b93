"""Small helpers for tests that talk to a real apiserver: polling with a deadline and
building throwaway pods whose command is a Python one-liner."""
from __future__ import annotations

import sys
import time
import uuid
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(fn: Callable[[], T], timeout: float = 60, interval: float = 0.25,
             what: str = "condition") -> T:
    """Call `fn` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
        except Exception as e:  # keep polling through transient API errors
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else ""))


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
