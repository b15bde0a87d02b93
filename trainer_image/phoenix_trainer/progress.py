"""This process's progress: step times on the loop, heartbeats and stack dumps off it.

``Progress`` is the session's part for issue "hung and slow" (``core.heartbeat`` has the
format and the rule). The loop's only cost is ``step(n)`` at each step boundary (a clock read
and a few list operations: measured in ``benchmarks/bench_checkpoint.py``); a gang's DDP hook
calls ``collective()`` when a step's first bucket is ready (compute time before the
collective, for stragglers). A daemon thread writes the heartbeat every interval and, once the
process has made no progress for the hang timeout while training or restoring, dumps the
stacks of every thread of this process and its children (``stacks.StackDumper``) to
``hangs/attempt-N/rank-R.txt`` - once per stall - and names it in the heartbeat.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Callable

from .core.contract import ENV_POD_NAME
from .core.heartbeat import (ACTIVITY_STARTING, ACTIVITY_TRAINING,
                             DEFAULT_HEARTBEAT_SECONDS, ENV_HANG_DETECTION,
                             ENV_HANG_TIMEOUT_SECONDS, ENV_HEARTBEAT_SECONDS, WATCHED, Heartbeat,
                             dump_key, hang_timeout, heartbeat_key, watch_timeout)
from .core.storage import Storage
from .stacks import StackDumper

log = logging.getLogger("phoenix.progress")

WINDOW = 128  # step times kept for the percentiles
ERROR_LOG_EVERY_SECONDS = 60.0


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


# The process's running ``Progress`` (one session per process), for ``note_collective``.
_ACTIVE: "Progress | None" = None


def note_collective() -> None:
    """A collective of this step is starting (called by ``distributed.exact_allreduce_hook``):
    the rank's compute time before it is what tells a straggler apart."""
    active = _ACTIVE
    if active is not None:
        active.collective()


class StepClock:
    """Step-boundary times (the loop's side; no I/O, no locks beyond the GIL's atomicity)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.step_times: deque[float] = deque(maxlen=WINDOW)
        self.compute_times: deque[float] = deque(maxlen=WINDOW)
        self.step = 0
        self.steps_timed = 0
        self._boundary: float | None = None  # when the newest boundary was reached
        self._first_collective: float | None = None
        self.last_progress = clock()

    def boundary(self, step: int) -> None:
        if step == self.step and self._boundary is not None:
            return  # the same boundary asked about twice (should_stop, then should_checkpoint)
        now = self.clock()
        if self._boundary is not None and step > self.step:
            self.step_times.append((now - self._boundary) / (step - self.step))
            self.steps_timed += 1
            if self._first_collective is not None:
                self.compute_times.append(self._first_collective - self._boundary)
        self._first_collective = None
        self.step, self._boundary, self.last_progress = step, now, now

    def collective(self) -> None:
        if self._first_collective is None and self._boundary is not None:
            self._first_collective = self.clock()

    def touch(self) -> None:
        self.last_progress = self.clock()

    @property
    def in_collective(self) -> bool:
        return self._first_collective is not None

    def stalled(self) -> float:
        return max(0.0, self.clock() - self.last_progress)

    def stats(self) -> tuple[float | None, float | None, float | None]:
        steps, compute = list(self.step_times), list(self.compute_times)
        return _percentile(steps, 0.5), _percentile(steps, 0.95), _percentile(compute, 0.5)


class Progress:
    """Heartbeats of one process of one attempt (see the module docstring)."""

    def __init__(self, storage: Storage | None, *, rank: int = 0, pod: str = "",
                 interval: float | None = None, explicit_timeout: float | None = None,
                 detect: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 log_: logging.Logger | logging.LoggerAdapter = log) -> None:
        self.storage, self.rank = storage, rank
        self.pod = pod or os.environ.get(ENV_POD_NAME) or os.environ.get("HOSTNAME", "")
        if interval is None:
            interval = _env_float(ENV_HEARTBEAT_SECONDS)
        # 0: no heartbeat at all (no hang detection for this process: benchmarks, tests)
        self.interval = DEFAULT_HEARTBEAT_SECONDS if interval is None else interval
        self.explicit = explicit_timeout if explicit_timeout is not None else _env_float(ENV_HANG_TIMEOUT_SECONDS)
        if detect is None:
            detect = os.environ.get(ENV_HANG_DETECTION, "true").lower() not in ("false", "0", "off")
        self.detect = detect
        self.clock = StepClock(clock)
        self.activity = ACTIVITY_STARTING
        self.attempt: int | None = None
        self.beat = 0
        self.stack_dump = ""
        self._dumped_for: float | None = None  # the stall (its last_progress) already dumped
        self._dumper: StackDumper | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_log = 0.0
        self.log = log_
        self.restored_from, self.restored_step = "", None
        self.training_since: float | None = None  # unix time of the first step after the restore

    # --- the loop's side -----------------------------------------------------------------
    def step(self, step: int) -> None:
        self.clock.boundary(step)
        if self.training_since is None and self.restored_from and step > (self.restored_step or 0):
            self.training_since = time.time()
        if self.activity != ACTIVITY_TRAINING and self.attempt is not None and self.activity in WATCHED:
            self.activity = ACTIVITY_TRAINING

    def collective(self) -> None:
        self.clock.collective()

    def restored(self, source: str, step: int | None) -> None:
        """Where the restore got the state ("peers", "checkpoint", "none") and its step."""
        self.restored_from, self.restored_step = source, step

    def set_activity(self, activity: str) -> None:
        """A new activity counts as progress (the restore began, training began, ...)."""
        self.activity = activity
        self.clock.touch()
        self._wake.set()

    # --- the thread ------------------------------------------------------------------------
    def start(self, attempt: int, activity: str) -> None:
        if self.storage is None or self._thread is not None or self.interval <= 0:
            return
        self.attempt = attempt
        self.set_activity(activity)
        if self.detect:
            try:
                self._dumper = StackDumper()
            except (OSError, ValueError, RuntimeError) as e:
                self.log.warning("no stack dumps on a hang: %s", e)
        self._thread = threading.Thread(target=self._run, name="phoenix-heartbeat", daemon=True)
        self._thread.start()
        global _ACTIVE
        _ACTIVE = self

    def close(self) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._dumper is not None:
            self._dumper.close()
            self._dumper = None

    def timeout(self) -> float:
        _, p95, _ = self.clock.stats()
        return watch_timeout(self.explicit, p95, self.activity) or hang_timeout(self.explicit, p95)

    def heartbeat(self) -> Heartbeat:
        p50, p95, compute = self.clock.stats()
        stalled = self.clock.stalled()
        return Heartbeat(attempt=self.attempt or 0, rank=self.rank, pod=self.pod,
                         step=self.clock.step, activity=self.activity,
                         stalled=round(stalled, 3), beat=self.beat,
                         last_progress_at=round(time.time() - stalled, 3),
                         steps_timed=self.clock.steps_timed,
                         step_p50=round(p50, 6) if p50 is not None else None,
                         step_p95=round(p95, 6) if p95 is not None else None,
                         compute_p50=round(compute, 6) if compute is not None else None,
                         in_collective=self.clock.in_collective,
                         hang_timeout=round(self.timeout(), 3),
                         # only this stall's dump (an older one is overwritten when it dumps)
                         stack_dump=self.stack_dump if self._dumped_for == self.clock.last_progress else "",
                         pid=os.getpid(), interval=self.interval,
                         restored_from=self.restored_from, restored_step=self.restored_step,
                         training_since=round(self.training_since, 3) if self.training_since else None)

    def beat_once(self) -> None:
        """One heartbeat write (and a stack dump first, if this stall reached the timeout)."""
        self.maybe_dump()
        self.beat += 1
        self._put(heartbeat_key(self.attempt or 0, self.rank), self.heartbeat().to_json())

    def maybe_dump(self) -> bool:
        if (not self.detect or self._dumper is None or self.activity not in WATCHED
                or self.clock.stalled() < self.timeout()
                or self._dumped_for == self.clock.last_progress):
            return False
        self._dumped_for = self.clock.last_progress
        stalled = self.clock.stalled()
        self.log.warning("no progress for %.0fs (timeout %.0fs) at step %d while %s: dumping the "
                         "stacks of every thread of this process and its children",
                         stalled, self.timeout(), self.clock.step, self.activity)
        header = (f"Phoenix stack dump: attempt {self.attempt} rank {self.rank} pod {self.pod}: "
                  f"no progress for {stalled:.0f}s at step {self.clock.step} while {self.activity}"
                  f" (timeout {self.timeout():.0f}s)")
        text = self._dumper.dump(header)
        key = dump_key(self.attempt or 0, self.rank)
        if self._put(key, text.encode()):
            self.stack_dump = key
        return True

    def _put(self, key: str, data: bytes) -> bool:
        try:
            assert self.storage is not None
            self.storage.put_bytes(key, data)
            return True
        except Exception as e:  # noqa: BLE001 - storage trouble: keep training, say so rarely
            now = time.monotonic()
            if now - self._last_error_log >= ERROR_LOG_EVERY_SECONDS:
                self._last_error_log = now
                self.log.warning("cannot write %s (%s: %s)", key, type(e).__name__, e)
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat_once()
            wait = self.interval
            if (self.detect and self.activity in WATCHED
                    and self._dumped_for != self.clock.last_progress):
                wait = min(wait, max(0.5, self.timeout() - self.clock.stalled() + 0.05))
            self._wake.wait(wait)
            self._wake.clear()
