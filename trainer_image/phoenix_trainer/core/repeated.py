"""A failure that repeats while a loop polls (a standby's or a spare's fence reads during a
storage outage): its first occurrence is a warning, then at most one warning per
``every`` seconds with the count since the last one, and one info line once it clears. A
loop polling twice a second would otherwise write a warning line every half second for as
long as the outage lasts."""
from __future__ import annotations

import logging
import time
from typing import Callable


class RepeatedFailure:
    def __init__(self, log: logging.Logger | logging.LoggerAdapter, what: str, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.what, self.every, self.clock = log, what, every, clock
        self.count = 0  # failures since the last success
        self._unreported = 0
        self._next_warning = 0.0

    def failed(self, error: BaseException) -> None:
        self.count += 1
        self._unreported += 1
        now = self.clock()
        if self.count > 1 and now < self._next_warning:
            return
        again = f" ({self._unreported} failures since the last warning)" if self.count > 1 else ""
        self.log.warning("%s failed (%s: %s); retrying%s", self.what, type(error).__name__,
                         error, again)
        self._unreported = 0
        self._next_warning = now + self.every

    def succeeded(self) -> None:
        if self.count:
            self.log.info("%s works again after %d failures", self.what, self.count)
        self.count = self._unreported = 0
        self._next_warning = 0.0
