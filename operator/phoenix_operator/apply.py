"""Apply a plan: named steps, run in this order (``STEPS``); the order is what makes it safe.

1. ``storage_writes``: what the status will record (a standby's promotion, or a spare
   taking a gang member's place: the fence;
   requests to running trainers: control.json). A lost status write only makes them again.
2. ``intent_status``: if pods are to be created, the status naming them first, guarded by
   the job's resourceVersion: an operator acting on a stale view loses this write (409) and
   creates nothing (see the ``decide`` package docstring).
3. ``force_deletes``: pods of lost nodes, before their replacements: never two pod objects.
4. ``services``: a gang's headless Service, through which its members resolve each other.
5. ``fences_and_pods``: per created pod its attempt's fence (``phase_storage.write_fence``, which
   also clears control.json; once per attempt, none for a standby) then the pod. No fence,
   no pod; a refused pod stops the pass (the status says "not created yet": a later pass
   retries), so status never names a pod that was not created without saying so.
6. ``pod_uids``: the new pods' uids into the status at once: from then on a missing pod
   means it was deleted. If this write fails, the next pass adopts the pod.
7. ``deletions``: the other deletions, with their grace.
8. ``status``: the plan's status, unless step 2 wrote it or nothing changed.
9. ``events``, then 10. ``metrics``.
11. ``record_history`` (``history_log``): the plan's attempt ends, starts, standbys and
    notices appended to each phase's ``history.jsonl``, then the summary into the status.
    Last, so it never delays a replacement; it never raises (trouble: retried next pass).

A step returns ``Stop`` to end the pass early with a requeue time, or raises ``RetryLater``
(already reported) to back off.

Every write goes through ``Applier.write``, the leadership gate (``leader``): a replica that
does not hold the Lease (any more) raises ``NotLeader`` at its next write and the pass ends
there, and the storage writes carry the leader's term (``phoenix_trainer.core.handshake``
refuses them over a newer leader's with ``StaleLeaderError``). Reads go through ``call``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Awaitable, Callable, NamedTuple

import kopf
from kubernetes.client.rest import ApiException

from . import constants as C
from . import prometheus
from phoenix_trainer.core.errors import StaleLeaderError

from .decide import CreatePod, Plan
from .history_log import HistoryLog, record_history
from .phase_storage import write_control, write_fence
from .gather import Call, Gather
from .kube import ForeignPod, Kube
from .leader import Leadership, NotLeader
from .phoenixjob import JobSpec, parse_ts, ts

log = logging.getLogger("phoenix.reconcile")


class RetryLater(Exception):
    """The pass stopped for a reason it has already reported (Event, log): try again after
    this job's backoff."""


class Stop(NamedTuple):
    """End the pass after this step: come back after ``requeue_after`` seconds."""

    requeue_after: float | None


@dataclass
class Applying:
    """One plan being applied: what its steps share."""

    job: dict
    spec: JobSpec
    plan: Plan
    written: dict  # the job as the last status write returned it
    status_written: bool = False
    uids: dict[str, str] = field(default_factory=dict)  # created pod -> uid

    @property
    def namespace(self) -> str:
        return self.job["metadata"]["namespace"]

    @property
    def name(self) -> str:
        return self.job["metadata"]["name"]

    @property
    def owner(self) -> dict[str, str]:
        """The job a fence names: its uid and namespace/name (``phase_storage.write_fence``)."""
        meta = self.job["metadata"]
        return {"uid": meta.get("uid") or "", "job": f"{meta.get('namespace')}/{meta['name']}"}

    @property
    def tag(self) -> str:
        return f"[{self.namespace}/{self.name}]"


# A write refused because this replica does not lead (any more): the pass ends, unreported.
LOST_LEADERSHIP = (NotLeader, StaleLeaderError)


class Applier:
    """Runs ``STEPS`` for a plan. ``fence_writer`` and ``control_writer`` are the storage
    writes (replaceable in tests); ``on_applied(job, plan)`` is told of every plan applied in
    full (job gauges); ``leadership()`` is the current gate (see the module docstring)."""

    def __init__(self, kube: Kube, call: Call, clock: Callable[[], datetime], gather: Gather,
                 on_applied: Callable[[dict, Plan], None],
                 leadership: Callable[[], Leadership] = Leadership) -> None:
        self.kube, self.call, self.clock, self.gather = kube, call, clock, gather
        self.on_applied = on_applied
        self.leadership = leadership
        self.fence_writer = write_fence
        self.control_writer = write_control
        self.history = HistoryLog()  # records not yet in storage, between passes

    async def write(self, fn, *args, **kwargs):
        """``call`` for a write: only while this replica leads (else ``NotLeader``)."""
        return await self.leadership().write(self.call, fn, *args, **kwargs)

    async def apply(self, job: dict, spec: JobSpec, plan: Plan) -> float | None:
        applying = Applying(job=job, spec=spec, plan=plan, written=job)
        for step in STEPS:
            stop = await step(self, applying)
            if stop is not None:
                return stop.requeue_after
        return plan.requeue_after

    def observe_replacement(self, cause: str | None, previous_end: datetime | None) -> None:
        if previous_end is not None:
            prometheus.REPLACEMENT_SECONDS.labels(cause or "unknown").observe(
                max(0.0, (self.clock() - previous_end).total_seconds()))

    async def warn(self, a: Applying, reason: str, msg: str) -> None:
        log.warning("%s %s", a.tag, msg)
        await self.write(self.kube.post_event, a.job, "Warning", reason, msg)

    async def fence(self, a: Applying, create: CreatePod) -> str | None:
        """Fence the phase's storage for ``create``'s attempt before its pod exists; returns
        why it could not (then the pod must not be created), or None."""
        try:
            access = await self.gather.storage_access(a.job, a.spec)
            await self.write(self.fence_writer, a.spec, create.phase, create.attempt, create.name,
                             ts(self.clock()), resume_from=create.resume_from, clear_control=True,
                             writer=self.leadership().term, credentials=access,
                             members=create.gang.members if create.gang else (),
                             store=create.gang.store if create.gang else "",
                             store_member=create.gang.store_member if create.gang else 0,
                             **a.owner)
        except LOST_LEADERSHIP:
            raise
        except Exception as e:  # noqa: BLE001 - any storage trouble: do not start, say why
            return f"{type(e).__name__}: {e}"[:300]
        return None


Step = Callable[[Applier, Applying], Awaitable["Stop | None"]]


async def storage_writes(ap: Applier, a: Applying) -> None:
    """Promotions (the fence) and trainer requests (control.json), before the status that
    records them: a lost status write only makes the same write again."""
    spec, plan = a.spec, a.plan
    term = ap.leadership().term
    owner = dict(a.owner, writer=term)
    writes = [(f"promote attempt {p.attempt} of phase {p.phase}", lambda acc, p=p: ap.fence_writer(
                  spec, p.phase, p.attempt, p.pod, ts(ap.clock()), resume_from=p.resume_from,
                  clear_control=True, **owner, credentials=acc,
                  **({"members": p.gang.members, "store": p.gang.store,
                      "store_member": p.gang.store_member} if p.gang else {})))
              for p in plan.promote]
    writes += [(f"write control.json of phase {c.phase}", lambda acc, c=c: ap.control_writer(
                   spec, c.phase, replace(c.control, writer=term), credentials=acc))
               for c in plan.control]
    if not writes:
        return
    what = "read the storage credentials"
    try:
        access = await ap.gather.storage_access(a.job, spec)
        for what, write in writes:
            await ap.write(write, access)
            log.info("%s %s", a.tag, what)
    except LOST_LEADERSHIP:
        raise
    except Exception as e:  # noqa: BLE001 - any storage trouble: retry, say why
        msg = f"cannot {what}: {type(e).__name__}: {e}"[:400]
        await ap.warn(a, C.EV_STORAGE_ERROR, msg)
        raise RetryLater(msg) from e
    for p in plan.promote:
        ap.observe_replacement(p.previous_cause, p.previous_end)


async def intent_status(ap: Applier, a: Applying) -> None:
    """Intent first: if our view of the job is stale, this write fails (409) and we create
    nothing; see the decide package's docstring."""
    if a.plan.create:
        a.written = await ap.write(ap.kube.patch_status, a.job, a.plan.status)
        a.status_written = True


async def force_deletes(ap: Applier, a: Applying) -> None:
    """The lost node's pod goes before its replacement comes: never two pod objects."""
    for delete in (d for d in a.plan.delete if d.force):
        log.info("%s force-deleting pod %s (%s: its node is lost)", a.tag, delete.name,
                 delete.reason)
        await ap.write(ap.kube.delete_pod, a.namespace, delete.name, 0)


async def services(ap: Applier, a: Applying) -> None:
    for service in a.plan.services:  # a gang's members resolve each other through it
        kopf.adopt(service, owner=a.job)
        await ap.write(ap.kube.ensure_service, a.namespace, service)


async def fences_and_pods(ap: Applier, a: Applying) -> Stop | None:
    fenced: set[tuple[str, int]] = set()
    for create in a.plan.create:
        # One fence per attempt (a gang's members share it); a standby waits unfenced.
        skip = create.standby or (create.phase, create.attempt) in fenced
        why = None if skip else await ap.fence(a, create)
        fenced.add((create.phase, create.attempt))
        if why is not None:
            await ap.warn(a, C.EV_STORAGE_ERROR,
                          f"phase {create.phase}: cannot write the storage fence for attempt "
                          f"{create.attempt} ({why}); not creating pod {create.name} while an "
                          f"older attempt could still write; retrying with backoff")
            raise RetryLater(f"no fence for attempt {create.attempt}")
        manifest = create.manifest
        kopf.adopt(manifest, owner=a.job)
        try:
            created = await ap.write(ap.kube.create_pod, a.namespace, manifest)
        except ForeignPod as e:
            # The status names the pod (intent) without a uid: the next pass finds the
            # foreign pod, and decide reports it as a condition instead of retrying.
            log.warning("%s %s", a.tag, e)
            return Stop(0.5)
        except ApiException as e:
            await ap.warn(a, "PodCreateFailed",
                          f"cannot create pod {create.name} for phase {create.phase}: "
                          f"{e.status} {e.reason}: {_api_message(e)}")
            # Status says "not created yet": a later pass retries, backing off.
            raise RetryLater(f"pod {create.name} refused ({e.status})") from e
        if created:
            a.uids[create.name] = created
            prometheus.PODS_CREATED.labels(a.namespace).inc()
            ap.observe_replacement(create.previous_cause, create.previous_end)
        log.info("%s phase=%s %s pod %s (attempt %d) resume_from=%s", a.tag, create.phase,
                 "created" if created else "found existing", create.name, create.attempt,
                 create.resume_from or "-")
    return None


async def pod_uids(ap: Applier, a: Applying) -> None:
    """Record "created" right away: from now on a missing pod means it was deleted."""
    if not a.uids:
        return
    for phase in a.plan.status.get("phases") or ():
        if phase.get("pod") in a.uids:
            phase["podUID"] = a.uids[phase["pod"]]
        standby = phase.get("standby") or {}
        if standby.get("pod") in a.uids:
            standby["podUID"] = a.uids[standby["pod"]]
    try:
        await ap.write(ap.kube.patch_status, a.written, a.plan.status)
    except ApiException as e:
        if e.status != 409:
            raise
        # someone changed the job meanwhile; the next pass records the uid from the pod


async def deletions(ap: Applier, a: Applying) -> None:
    for delete in (d for d in a.plan.delete if not d.force):
        log.info("%s deleting pod %s (%s)", a.tag, delete.name, delete.reason)
        await ap.write(ap.kube.delete_pod, a.namespace, delete.name, delete.grace_seconds)


async def status(ap: Applier, a: Applying) -> None:
    if not a.status_written and a.plan.status != (a.job.get("status") or {}):
        await ap.write(ap.kube.patch_status, a.job, a.plan.status)


async def events(ap: Applier, a: Applying) -> None:
    for note in a.plan.events:
        log.info("%s %s: %s", a.tag, note.reason, note.message)
        await ap.write(ap.kube.post_event, a.job, note.type, note.reason, note.message)


# Events whose posting counts one of prometheus.STANDBY_COUNTERS.
STANDBY_METRICS = {C.EV_NOTICE: "phoenix_notices_total",
                   C.EV_STANDBY_STARTED: "phoenix_standbys_started_total",
                   C.EV_HANDOFF: "phoenix_handoffs_total",
                   C.EV_PROMOTED: "phoenix_standby_promotions_total"}


async def metrics(ap: Applier, a: Applying) -> None:
    for r in a.plan.recoveries:
        prometheus.count_recovery(a.namespace, a.name, r.phase, r.cause, r.reason)
    for note in a.plan.events:
        if note.reason in STANDBY_METRICS:
            prometheus.count_standby_event(a.namespace, a.name, STANDBY_METRICS[note.reason])
    ap.on_applied(a.job, a.plan)
    t = parse_ts(a.plan.status.get("lastCheckpointTime"))
    for phase in a.plan.status.get("phases") or ():  # a phase no longer running: removed
        prog = phase.get("progress") if phase.get("state") == "Running" else None
        last = parse_ts(prog["lastStepTime"]) if prog else None
        prometheus.set_progress(a.namespace, a.name, phase["name"],
                                a.plan.rank_times.get(phase["name"], []) if prog else [],
                                last.timestamp() if last else None)
    prometheus.set_checkpoint_time(a.namespace, a.name, a.plan.status.get("currentPhase"),
                                   t.timestamp() if t else None)


STEPS: tuple[Step, ...] = (storage_writes, intent_status, force_deletes, services,
                           fences_and_pods, pod_uids, deletions, status, events, metrics,
                           record_history)


def _api_message(e: ApiException) -> str:
    try:
        return json.loads(e.body).get("message", "")[:300]
    except (TypeError, ValueError, AttributeError):
        return str(e.body)[:300]
