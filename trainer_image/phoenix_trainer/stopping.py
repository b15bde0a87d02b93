"""The cooperative stop: a flag the SIGTERM handler and the operator's handoff request set,
which the loop reads at its next step boundary.

Holds who asked (the signal or the handoff), when (the grace period counts from then) and,
for a handoff, which standby takes over. Never does real work in the signal handler or on
the control thread: setting these flags is all either does.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

# ``request``'s "signal" for an operator-requested handoff (no real signal is 0), and how long
# its final checkpoint may take: no SIGTERM grace applies, nothing is killing the pod.
HANDOFF_SIGNAL = 0
HANDOFF_SAVE_LIMIT_SECONDS = 3600.0


class StopRequest:
    """Whether (and why, since when) the loop should stop at its next step boundary."""

    def __init__(self, clock: Callable[[], float], log: logging.LoggerAdapter) -> None:
        self.clock, self.log = clock, log
        self.signum: int | None = None
        self.label = ""
        self.since: float | None = None
        self.handoff: tuple[int, str] | None = None  # (standby attempt, its pod)
        self._previous_handler: Any = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def is_handoff(self) -> bool:
        """The operator asked for a handoff and that, not a signal, is why we stop."""
        return self.handoff is not None and self.signum == HANDOFF_SIGNAL

    def request(self, signum: int = signal.SIGTERM, label: str = "") -> None:
        """Ask the loop to stop at its next step boundary (the first request counts)."""
        if self.signum is None:
            self.since = self.clock()
            self.label = label or signal.Signals(signum).name
            self.signum = signum

    def hand_off(self, attempt: int, pod: str) -> None:  # control thread: flags only
        self.handoff = (attempt, pod)
        self.log.info("operator asks to hand off to standby attempt %d (pod %s) at the next"
                      " step boundary", attempt, pod or "?")
        self.request(HANDOFF_SIGNAL, label=f"handoff to attempt {attempt}")

    def install(self, on_signal: Callable[[int], None]) -> None:
        """SIGTERM -> ``on_signal(signum)`` (main thread only; ``uninstall`` puts the old one back)."""
        if threading.current_thread() is not threading.main_thread() or self._previous_handler is not None:
            return

        def handler(signum, frame):  # only a flag: never do real work in a signal handler
            on_signal(signum)

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def uninstall(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
