"""Who a run's decisions are shared with: the collective choices a session makes, as one part.

A run is one process or a process group. The session asks its peers the same questions
either way: do all of us agree (``all``), what does any of us want at this step boundary
(``agree``), what did the leader pick (``pick``), what does every one of us say (``gather``),
wait for everyone (``barrier``); and which roles this process holds (``leads``: rank 0 of
the run writes the manifest, metrics and retention and reads control.json; ``leads_pod``:
local rank 0 answers the readiness probe and writes the termination message).
``SoloPeers`` is the one-process answer; ``distributed.GroupPeers`` the process group's.

Never does I/O against checkpoint storage and never imports torch (a group's peers live in
distributed.py); a decision it returns is the same on every process, or it is a bug.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, TypeVar

T = TypeVar("T")


class Peers(Protocol):
    rank: int
    world_size: int
    leads: bool
    leads_pod: bool

    def describe(self, context: str) -> str: ...
    def agree(self, step: int, flags: Callable[[], Sequence[bool]]) -> tuple[bool, ...]: ...
    def all(self, ok: bool) -> bool: ...
    def pick(self, choose: Callable[[], T]) -> T: ...
    def gather(self, value: Any) -> list[Any]: ...
    def barrier(self) -> None: ...


class SoloPeers:
    """One process: every question answers itself."""

    rank, world_size = 0, 1
    leads = leads_pod = True

    def describe(self, context: str) -> str:
        """The log context of this process."""
        return context

    def agree(self, step: int, flags: Callable[[], Sequence[bool]]) -> tuple[bool, ...]:
        """Each of ``flags()`` true on any process (at ``step``; every process asks once)."""
        return tuple(flags())

    def all(self, ok: bool) -> bool:
        """True iff every process says ``ok``."""
        return ok

    def pick(self, choose: Callable[[], T]) -> T:
        """What ``choose()`` returns on the leader, on every process."""
        return choose()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, by rank."""
        return [value]

    def barrier(self) -> None:
        """Wait until every process is here."""
