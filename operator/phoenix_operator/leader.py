"""Who may write: leader election on a ``coordination.k8s.io/v1`` Lease, and the gate every
operator write passes (``Leadership.holds``).

Several operator replicas run; all of them watch (their caches stay warm), one leads. The
leader renews the Lease every ``retry`` seconds; a standby takes the Lease over once it has
seen the same record, unchanged, for ``duration`` seconds (by its own monotonic clock: no
clock agreement between nodes is assumed, as in client-go). The leader stops writing when it
could not renew for ``renew_deadline`` seconds (< ``duration``), counted from the start of
its last successful renewal, so a partitioned leader has stopped ``duration -
renew_deadline`` seconds before anyone else may start. On SIGTERM the leader releases the
Lease (holder emptied) and a standby takes it at its next try, without the wait.

``term``: the Lease's ``leaseTransitions`` at this replica's acquisition. It goes up by one
with every acquisition, so together with the Lease's uid it orders leaders; the operator's
storage writes carry it (``LeaderTerm``) and refuse to overwrite a file a newer term wrote
(``phoenix_trainer.core.handshake``), the half of the safety argument that does not depend
on timing. A replica that finds its own name as holder at start (its container restarted)
takes a new term: the old process is gone, its in-flight writes are not.

The Lease calls themselves are ``Kube``'s (``get_lease``, ``create_lease``, ``replace_lease``).

Why not the Kubernetes client's ``leaderelection`` package: it runs a blocking thread with
its own loop, has no release (a drain would wait the whole lease out), and does not expose
the transition count the storage writes need. The loop here is the same algorithm in
~150 lines on the event loop, with a pure ``next_record`` at its centre.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Awaitable, Callable

from kubernetes.client.rest import ApiException

from phoenix_trainer.core.handshake import LeaderTerm

from . import prometheus
from .kube import Kube
from .phoenixjob import parse_ts

log = logging.getLogger("phoenix.leader")

LOG_PREFIX = "LEADERSHIP"  # every transition is logged on one line starting with this


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease fields the election uses (``spec`` and two of ``metadata``)."""

    holder: str = ""
    duration: int = 15
    acquire_time: str = ""
    renew_time: str = ""
    transitions: int = 0
    uid: str = ""
    resource_version: str = ""

    @classmethod
    def from_lease(cls, lease: dict) -> "LeaseRecord":
        spec, meta = lease.get("spec") or {}, lease.get("metadata") or {}
        return cls(holder=spec.get("holderIdentity") or "",
                   duration=int(spec.get("leaseDurationSeconds") or 0),
                   acquire_time=spec.get("acquireTime") or "",
                   renew_time=spec.get("renewTime") or "",
                   transitions=int(spec.get("leaseTransitions") or 0),
                   uid=meta.get("uid") or "", resource_version=meta.get("resourceVersion") or "")

    def spec(self) -> dict:
        return {"holderIdentity": self.holder or None, "leaseDurationSeconds": self.duration,
                "acquireTime": self.acquire_time or None, "renewTime": self.renew_time or None,
                "leaseTransitions": self.transitions}

    def same_as(self, other: "LeaseRecord | None") -> bool:
        """Unchanged since ``other`` was seen (the holder did not renew in between)."""
        return other is not None and (self.holder, self.renew_time, self.transitions) == (
            other.holder, other.renew_time, other.transitions)


def micro_time(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def next_record(current: LeaseRecord | None, me: str, leading: bool, expired: bool,
                now: datetime, duration: int) -> LeaseRecord | None:
    """What ``me`` writes to the Lease now, or None to leave it alone (another holder's lease
    has not expired). Pure. ``leading``: this process holds it (a renewal, same term);
    ``expired``: the current record stayed unchanged for its whole duration as this process
    saw it. A holder of our name that we do not know as ours is a previous incarnation of
    this replica: a new term."""
    stamp = micro_time(now)
    if current is None:
        return LeaseRecord(holder=me, duration=duration, acquire_time=stamp, renew_time=stamp)
    if leading and current.holder == me:
        return replace(current, duration=duration, renew_time=stamp)
    if current.holder and current.holder != me and not expired:
        return None
    return replace(current, holder=me, duration=duration, acquire_time=stamp, renew_time=stamp,
                   transitions=current.transitions + 1)


def describe_lease(lease: dict, now: datetime) -> dict:
    """Who leads, as ``phoenixctl status`` shows it: the Lease is the source of truth."""
    record, meta = LeaseRecord.from_lease(lease), lease.get("metadata") or {}
    renewed = parse_ts(record.renew_time)
    quiet = (now - renewed).total_seconds() if renewed else None
    return {"lease": f"{meta.get('namespace')}/{meta.get('name')}",
            "leader": record.holder or None, "term": record.transitions,
            "since": record.acquire_time or None, "renewed": record.renew_time or None,
            # A holder that stopped renewing: its standby takes over after the duration.
            "expired": bool(record.holder) and quiet is not None and quiet > record.duration}


def _own_thread() -> Callable[..., Awaitable]:
    executor = ThreadPoolExecutor(1, thread_name_prefix="phoenix-lease")

    async def call(fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            executor, lambda: fn(*args, **kwargs))
    return call


class NotLeader(Exception):
    """A write was refused: this replica does not hold the Lease (any more)."""


class Leadership:
    """Whether this process may write, and the term its storage writes carry. The base class
    is a standalone operator: always the leader, term 0 (storage writes unguarded)."""

    identity = "standalone"

    def holds(self) -> bool:
        return True

    @property
    def term(self) -> LeaderTerm:
        return LeaderTerm()

    async def write(self, call: Callable[..., Awaitable], fn, *args, **kwargs):
        """Run the write ``fn`` through ``call`` if this process holds the lease (else
        ``NotLeader``)."""
        if not self.holds():
            raise NotLeader(f"{self.identity} does not hold the lease")
        return await call(fn, *args, **kwargs)


class LeaseElector(Leadership):
    """The election loop (``run``) and the gate. ``on_lead`` is called (on the event loop)
    when this replica becomes the leader: the reconciler queues every job it knows."""

    def __init__(self, kube: Kube, call: Callable[..., Awaitable] | None = None, *,
                 namespace: str, name: str, identity: str, duration: float = 15,
                 renew_deadline: float = 10, retry: float = 2, on_lead: Callable[[], None] = lambda: None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if not retry < renew_deadline < duration:
            raise ValueError(f"leader election needs retry ({retry}) < renew deadline "
                             f"({renew_deadline}) < lease duration ({duration})")
        # Its own thread by default: a renewal must not queue behind a burst of reconcile
        # calls in the operator's API threads (500 jobs starting at once), or the leader
        # would miss its own renew deadline under load.
        self.kube, self.call = kube, call or _own_thread()
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration, self.renew_deadline, self.retry = duration, renew_deadline, retry
        self.on_lead, self.clock, self.monotonic = on_lead, clock, monotonic
        self.leading = False
        self.renewed_at = float("-inf")  # monotonic start of the last successful renewal
        self.observed: LeaseRecord | None = None
        self.observed_at = float("-inf")  # monotonic time the observed record last changed
        self._term = LeaderTerm()
        self._in_flight = 0
        self._released = False

    # --- the gate ---------------------------------------------------------------------
    def holds(self) -> bool:
        return (self.leading and not self._released
                and self.monotonic() - self.renewed_at < self.renew_deadline)

    @property
    def term(self) -> LeaderTerm:
        return self._term

    @property
    def holder(self) -> str:
        return self.observed.holder if self.observed else ""

    async def write(self, call, fn, *args, **kwargs):
        """As ``Leadership.write``, counted in flight so that ``release`` waits for it."""
        if not self.holds():
            raise NotLeader(f"{self.identity} does not hold lease {self.namespace}/{self.name}"
                            f" (holder: {self.holder or 'none'})")
        self._in_flight += 1
        try:
            return await call(fn, *args, **kwargs)
        finally:
            self._in_flight -= 1

    # --- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        while not self._released:
            await self.try_once()
            if self.leading and not self.holds():
                self._step_down("could not renew within the renew deadline")
            # A leader renews every retry period; a standby tries with jitter (client-go's
            # 1.2 factor) so two standbys do not collide on every try.
            await asyncio.sleep(self.retry if self.leading else
                                self.retry * random.uniform(1.0, 1.2))

    async def try_once(self) -> bool:
        """One acquire-or-renew; whether this replica leads afterwards."""
        started = self.monotonic()
        try:
            lease = await self.call(self.kube.get_lease, self.namespace, self.name)
            current = LeaseRecord.from_lease(lease) if lease is not None else None
            if current is not None and not current.same_as(self.observed):
                self.observed, self.observed_at = current, started
            if self.leading and (current is None or current.holder != self.identity):
                self._step_down(f"the lease is held by {current.holder if current else 'nobody'}"
                                " now")
            expired = started - self.observed_at >= (current.duration if current and
                                                     current.duration else self.duration)
            record = next_record(current, self.identity, self.leading, expired, self.clock(),
                                 int(self.duration))
            if record is None:
                self._observe_other(current)
                return False
            if lease is None:
                written = await self.call(self.kube.create_lease, self.namespace, self.name,
                                          record.spec())
            else:
                written = await self.call(self.kube.replace_lease, lease, record.spec(),
                                          record.resource_version)
        except ApiException as e:
            if e.status != 409:  # 409: someone else wrote first; look again next time
                log.warning("lease %s/%s: %s %s", self.namespace, self.name, e.status, e.reason)
            return self.leading
        except Exception as e:  # noqa: BLE001 - the API server unreachable: try again
            log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            return self.leading
        new = LeaseRecord.from_lease(written)
        self.observed, self.observed_at = new, started
        self.renewed_at = started
        if not self.leading:
            self._become_leader(written, new)
        return True

    def _become_leader(self, lease: dict, record: LeaseRecord) -> None:
        self.leading = True
        self._term = LeaderTerm(term=record.transitions, leader=self.identity,
                                lease_uid=record.uid)
        self._transition(lease, "LeaderElected",
                         f"{self.identity} leads (term {record.transitions})")
        self.on_lead()

    def _observe_other(self, current: LeaseRecord | None) -> None:
        prometheus.set_leader(False, current.holder if current else "",
                              current.transitions if current else 0, None)

    def _step_down(self, why: str) -> None:
        self.leading = False
        log.warning("%s %s stopped leading (term %d): %s", LOG_PREFIX, self.identity,
                    self._term.term, why)
        prometheus.set_leader(False, self.holder, self._term.term, time.time())

    def _transition(self, lease: dict, reason: str, message: str) -> None:
        log.info("%s %s", LOG_PREFIX, message)
        prometheus.set_leader(True, self.identity, self._term.term, time.time())
        asyncio.get_running_loop().run_in_executor(
            None, self.kube.post_event, lease, "Normal", reason, message)

    async def release(self, wait_writes: float = 5.0) -> None:
        """Stop writing, let writes in flight finish (at most ``wait_writes`` s), then hand
        the Lease back (holder emptied) so a standby takes it at its next try."""
        was_leading = self.holds()
        self._released = True
        if not was_leading:
            return
        deadline = self.monotonic() + wait_writes
        while self._in_flight and self.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            lease = await self.call(self.kube.get_lease, self.namespace, self.name)
            if lease is None or LeaseRecord.from_lease(lease).holder != self.identity:
                return
            record = replace(LeaseRecord.from_lease(lease), holder="", duration=1,
                             renew_time=micro_time(self.clock()))
            written = await self.call(self.kube.replace_lease, lease, record.spec(),
                                      record.resource_version)
        except Exception as e:  # noqa: BLE001 - best effort: the lease then simply expires
            log.warning("%s %s could not release the lease: %s", LOG_PREFIX, self.identity, e)
            return
        self.leading = False
        message = f"{self.identity} released the lease (term {self._term.term})"
        log.info("%s %s", LOG_PREFIX, message)
        prometheus.set_leader(False, "", self._term.term, time.time())
        await self.call(self.kube.post_event, written, "Normal", "LeaderReleased", message)
