"""A work queue of keys, apart from the reconciler that uses it (controller-runtime keeps its
rate-limited work queue apart from its reconcilers; so does this).

What it promises, for any hashable key: triggers coalesce (a key already queued is not
queued again, so a burst of events costs one pass); at most one pass per key at a time, and
at most ``max_concurrent`` passes at once; a pass may ask to run again after a delay (only
the earliest pending timer per key is kept); per-key exponential backoff (``Backoff``) for
passes that failed; and a periodic resync of the keys the caller names.

It knows nothing of what a key means: it is handed ``reconcile(key)``, which returns the
seconds after which to run that key again (None: only when triggered). Whoever supplies
``reconcile`` decides what a failure is and asks ``backoff`` for the delay.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, Hashable, Iterable, TypeVar

K = TypeVar("K", bound=Hashable)


class Backoff:
    """``initial * 2**n`` seconds after the n-th failure in a row (0-based), at most
    ``maximum``; independent per key; a success starts the key over. Pure bookkeeping: no
    clock, no timers (the queue schedules)."""

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


class WorkQueue(Generic[K]):
    """Runs ``reconcile(key)`` for the keys it is given (see the module docstring). Call from
    the event loop's thread."""

    def __init__(self, reconcile: Callable[[K], Awaitable[float | None]], *,
                 max_concurrent: int, backoff: Backoff | None = None) -> None:
        self.reconcile = reconcile
        self.backoff = backoff or Backoff()
        self._locks: dict[K, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(max_concurrent)
        self._queued: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()

    def add(self, key: K) -> None:
        """Ask for a pass; a no-op if one is already queued for this key."""
        if key in self._queued:
            return
        self._queued.add(key)
        task = asyncio.get_running_loop().create_task(self.process(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def add_after(self, key: K, delay: float) -> None:
        """Ask for a pass in ``delay`` seconds, unless one is already due sooner."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        old = self._timers.get(key)
        if old is not None and not old.cancelled() and old.when() <= when:
            return
        if old is not None:
            old.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: K) -> None:
        """The key is gone: drop its timer, its backoff and (unless a pass holds it) its lock."""
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]
        self.backoff.success(key)
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()

    async def resync_forever(self, period: float, keys: Callable[[], Iterable[K]]) -> None:
        """Every ``period`` seconds, queue every key ``keys()`` names."""
        while True:
            await asyncio.sleep(period)
            for key in list(keys()):
                self.add(key)

    async def process(self, key: K) -> None:
        """One pass for ``key``, after any pass of it still running and once a slot is free;
        then schedules the next one if the pass asked for it."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock, self._slots:
            self._queued.discard(key)  # after the wait: triggers until now are this pass's
            requeue = await self.reconcile(key)
        if requeue is not None:
            self.add_after(key, requeue)
