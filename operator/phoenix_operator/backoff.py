"""Per-job exponential backoff for passes that failed: one class, one job.

controller-runtime keeps its rate limiter apart from the reconciler; so does this. The
Reconciler asks ``failure(key)`` for the delay before the next try and calls ``success(key)``
when a pass went through. Pure bookkeeping: no clock, no timers (the caller schedules).
"""
from __future__ import annotations

from typing import Hashable


class Backoff:
    """``initial * 2**n`` seconds after the n-th failure in a row (0-based), at most
    ``maximum``; independent per key; a success starts the key over."""

    def __init__(self, initial: float = 1.0, maximum: float = 300.0) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {initial}, {maximum}")
        self.initial, self.maximum = initial, maximum
        self._failures: dict[Hashable, int] = {}

    def failure(self, key: Hashable) -> float:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        return min(self.maximum, self.initial * (2 ** min(n, 62)))

    def success(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def failures(self, key: Hashable) -> int:
        return self._failures.get(key, 0)
