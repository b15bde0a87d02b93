"""Per-attempt metrics: JSON lines kept locally and uploaded beside the checkpoints.

S3 cannot append, so each attempt owns one object, ``<prefix>/metrics/attempt-<n>.jsonl``,
which it rewrites whole (on every checkpoint commit, every ``interval_seconds`` and at the
end). Attempts never write each other's files, so no read-modify-write races. ``read_metrics``
concatenates them in attempt order. No torch import; never blocks the training step on the
network (uploads go through the checkpoint thread).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from typing import Any

from .core.layout import METRICS_DIR, metrics_key
from .core.storage import Storage
from .core.writer import utcnow_iso

log = logging.getLogger("phoenix.metrics")
_ATTEMPT_RE = re.compile(r"attempt-(\d+)\.jsonl$")


def process_start_time() -> float | None:
    """Unix time this process started, from the kernel (Linux ``/proc``); None elsewhere.

    A container's PID 1 started when its container did, so in a pod this is where the
    trainer's own start-up begins: everything before it is the kubelet's."""
    try:
        with open("/proc/self/stat") as f:
            # Fields after the command name (which may hold spaces and parentheses):
            # state is field 3, starttime (clock ticks after boot) field 22.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - max(0.0, age)


def next_attempt(storage: Storage) -> int:
    """The first attempt number without a metrics file (for runs outside the operator)."""
    seen = [int(m.group(1)) for k in storage.list_keys(METRICS_DIR) if (m := _ATTEMPT_RE.search(k))]
    return max(seen) + 1 if seen else 0


def read_metrics(storage: Storage) -> list[dict[str, Any]]:
    keys = [(int(m.group(1)), k) for k in storage.list_keys(METRICS_DIR) if (m := _ATTEMPT_RE.search(k))]
    out: list[dict[str, Any]] = []
    for _, key in sorted(keys):
        for line in storage.get_bytes(key).decode().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


class MetricsLog:
    def __init__(self, storage: Storage | None, attempt: int, base: dict[str, Any]) -> None:
        self.storage = storage
        self.attempt = attempt
        self.base = dict(base)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._uploaded = 0

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": utcnow_iso(), "event": event, **self.base, **fields}
        with self._lock:
            self._lines.append(json.dumps(record, sort_keys=True))
        return record

    def upload(self) -> None:
        """Rewrite this attempt's object; safe to call from the upload thread."""
        if self.storage is None:
            return
        with self._lock:
            if len(self._lines) == self._uploaded:
                return
            body = ("\n".join(self._lines) + "\n").encode()
            n = len(self._lines)
        try:
            self.storage.put_bytes(metrics_key(self.attempt), body)
            self._uploaded = n
        except Exception as e:  # noqa: BLE001 - metrics are best effort, training goes on
            log.warning("metrics upload to %s failed: %s", self.storage.uri_for(metrics_key(self.attempt)), e)

    @property
    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(line) for line in self._lines]
