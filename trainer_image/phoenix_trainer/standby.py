"""A warm standby's wait: until the fence names this attempt, keep the newest committed
checkpoint loaded, so that promotion costs no download.

Started as a standby (``PHOENIX_ROLE=standby``), a session's restore first waits here. Every
process of a gang waits on its own, with no collective while it waits (one would time out),
and preloads its own part through the restorer; the session meets its peers afterwards.
Promotion is only ever by the fence; SIGTERM or a newer fence ends the wait through ``end``
(which writes the termination message and exits).

Never writes to storage and never promotes itself.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, NoReturn

from .core.contract import TrainerEnv
from .core.errors import CheckpointError, ConfigMismatchError
from .core.handshake import FENCE_NAME, Fence, read_fence
from .core.layout import latest_valid_checkpoint
from .core.repeated import RepeatedFailure
from .core.storage import Storage
from .restore import Restorer
from .stopping import StopRequest

# A waiting standby looks for a newer committed checkpoint to preload this often.
STANDBY_PREFETCH_SECONDS = 2.0


class Standby:
    """Waits for promotion; see the module docstring."""

    def __init__(self, *, env: TrainerEnv, storage: Storage | None, restorer: Restorer,
                 stop: StopRequest, clock: Callable[[], float], log: logging.LoggerAdapter,
                 mark_ready: Callable[[], None], end: Callable[[str], NoReturn]) -> None:
        self.env, self.storage, self.restorer, self.stop = env, storage, restorer, stop
        self.clock, self.log, self.mark_ready, self.end = clock, log, mark_ready, end
        self._fence_reads = RepeatedFailure(log, f"standby: reading {FENCE_NAME}", clock=clock)

    def wait(self, attempt: int) -> str | None:
        """Wait until the fence names ``attempt``; meanwhile keep the newest committed
        checkpoint loaded (``restorer.warm``). Returns the checkpoint the fence says to resume
        from (None: the newest valid one)."""
        if self.storage is None:
            raise CheckpointError("a standby needs checkpoint storage (PHOENIX_CHECKPOINT_URI)")
        self.log.info("standby attempt %d: waiting for promotion (polling %s every %.2fs)",
                      attempt, self.storage.uri, self.env.control_poll_seconds)
        next_preload = 0.0
        while True:
            if self.stop.requested:
                self.end(f"standby attempt {attempt} stopped ({self.stop.label}) before it was promoted")
            fence = self._read_fence()
            uid = self.env.job_uid
            if fence is not None and fence.attempt == attempt and fence.holds(attempt, uid):
                self.log.info("standby attempt %d promoted (resume from %s)", attempt,
                              fence.resume_from or "the newest valid checkpoint")
                return fence.resume_from or None
            if fence is not None and not fence.holds(attempt, uid):
                other = f" of job {fence.job}" if uid and fence.uid and fence.uid != uid else ""
                self.end(f"standby attempt {attempt} superseded by attempt {fence.attempt}{other}"
                         " before it was promoted")
            if self.clock() >= next_preload:
                self.preload()
                self.mark_ready()
                next_preload = self.clock() + STANDBY_PREFETCH_SECONDS
            time.sleep(self.env.control_poll_seconds)

    def _read_fence(self) -> Fence | None:
        assert self.storage is not None
        try:
            fence = read_fence(self.storage)
        except Exception as e:  # noqa: BLE001 - keep waiting; promotion is only ever by the fence
            self._fence_reads.failed(e)
            return None
        self._fence_reads.succeeded()
        return fence

    def preload(self) -> None:
        """Load (this process's part of) the newest valid checkpoint if it is newer than the
        one held. No collectives: every process of a gang does this on its own."""
        assert self.storage is not None
        held = self.restorer.warm
        try:
            info = latest_valid_checkpoint(self.storage, deep=False)
            if info is None or (held is not None and held.info.uri == info.uri):
                return
            t0 = time.perf_counter()
            self.restorer.warm = None  # so try_load loads it (and may reuse its download folder)
            warm = self.restorer.try_load(self.storage, info)
        except ConfigMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - a standby retries; the resume verifies again
            self.log.warning("standby: preloading the newest checkpoint failed (%s: %s)",
                             type(e).__name__, e)
            return
        if warm is not None:
            self.restorer.warm = warm
            self.log.info("standby: holding checkpoint step %d in memory (loaded in %.2fs)",
                          info.step, time.perf_counter() - t0)
