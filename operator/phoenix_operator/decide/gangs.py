"""Gangs (``replicas`` > 1): an attempt's members are one unit. How a gang's attempt
stands (the member that ended it), and all-or-nothing scheduling: a gang not fully bound to
nodes within ``recovery.gangScheduleTimeoutSeconds`` releases its pods (no budget charged)
and tries again after the same time.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

from .. import constants as C
from ..constants import Cause
from ..outcomes import LIVE, Outcome, gone
from ..phoenixjob import Failure, PhaseSpec, PhaseStatus, parse_ts
from ..podspec import in_place_gang, member_of, pod_name
from ..states import Event, transition
from .plan import Ctx


def gang_outcome(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus,
                 members: Sequence[Mapping[str, Any]]
                 ) -> tuple[Outcome, Mapping[str, Any] | None, list[Mapping[str, Any]]]:
    """How a gang's recorded attempt stands (see ``attempts.attempt_outcome``): live while no
    member ended; completed when all completed; else the earliest preempted member ends it,
    or, with no preemption, the earliest failed one (see the package docstring). A member
    that exited with an error while its peers still run ends it only once the peers ended too
    or ``GANG_SETTLE_SECONDS`` passed: a peer's lost node may not be known yet."""
    by_member = {member_of(p): p for p in members}
    seen = []
    for i in range(phase.replicas):
        pod = by_member.get(i)
        name = pod_name(ctx.job, phase.name, st.member_attempt(i), i)
        seen.append((pod, ctx.outcome(pod) if pod is not None else gone(name), name))
    live = [p for p, o, _ in seen if o.live and p is not None]
    ended = [(p, o, n) for p, o, n in seen if not o.live]
    if not ended:
        return LIVE, None, live
    if all(o.cause == Cause.COMPLETED for _, o, _ in seen):
        return seen[0][1], seen[0][0], []
    bad = [x for x in ended if x[1].cause != Cause.COMPLETED]
    if not bad:
        return LIVE, None, live  # some done, the others finishing
    preempted = [x for x in bad if x[1].cause == Cause.PREEMPTION]
    far = datetime.max.replace(tzinfo=ctx.now.tzinfo)
    # Earliest first; at the same second, a member killed by a signal or OOM before one that
    # exited with an error (torchrun exits 1 when it loses a peer).
    killed = {C.SIGTERM_EXIT, C.SIGKILL_EXIT}
    if not preempted and live and not in_place_gang(ctx.spec, phase) and all(
            o.exit_code not in killed and o.reason != C.R_OOM for _, o, _ in bad):
        # Only errors so far, peers still running: an error is what a member shows when a
        # peer's node vanished (its collective failed) before that loss is known here (the
        # Node object deleted, or NotReady); wait a little for the peers to end or be lost.
        # (An in-place gang's survivors rejoin instead of exiting: its errors are its own.)
        first = min((o.finished_at for _, o, _ in bad if o.finished_at), default=None)
        left = (C.GANG_SETTLE_SECONDS - (ctx.now - first).total_seconds()) if first else 0.0
        if left > 0:
            ctx.plan.requeue(left)
            return LIVE, None, live
    pod, outcome, name = min(preempted or bad, key=lambda x: (
        x[1].finished_at or far, x[1].exit_code not in killed and x[1].reason != C.R_OOM, x[2]))
    return outcome, pod if pod is not None else {"metadata": {"name": name}}, live


def unscheduled_past_timeout(ctx: Ctx, members: Sequence[Mapping[str, Any]],
                              since: datetime) -> list[str]:
    """A gang's members not bound to a node, once gangScheduleTimeoutSeconds have passed
    since the first of them was created (``since`` when none says); else [] (and a requeue for when
    the time is up)."""
    unbound = [p for p in members if not (p.get("spec") or {}).get("nodeName")]
    waiting = [p["metadata"]["name"] for p in unbound]
    if not waiting:
        return []
    # from the creation of the waiting pods (an in-place gang's survivors are older)
    created = [t for p in unbound if (t := parse_ts((p.get("metadata") or {}).get("creationTimestamp")))]
    left = ctx.spec.recovery.gang_schedule_timeout - (
        ctx.now - (min(created) if created else since)).total_seconds()
    if left > 0:
        ctx.plan.requeue(left)
        return []
    return waiting


def gang_scheduled_in_time(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus,
                            members: Sequence[Mapping[str, Any]]) -> PhaseStatus:
    """All-or-nothing: a gang whose members are not all bound to nodes within the timeout
    releases what it holds (deletes its pods; no budget charged) and tries again later."""
    waiting = unscheduled_past_timeout(ctx, members, ctx.now)
    if not waiting:
        return st
    timeout = ctx.spec.recovery.gang_schedule_timeout
    why = (f"{len(waiting)} of {phase.replicas} pods ({', '.join(waiting)}) not scheduled within"
           f" gangScheduleTimeoutSeconds={timeout:g}; released the gang's pods, trying again in"
           f" {timeout:g}s")
    ctx.note("Warning", C.EV_GANG_UNSCHEDULABLE, f"phase {phase.name}: {why}")
    ctx.delete_live(members, "gang not schedulable in time")
    failure = Failure(cause="unschedulable", reason=C.EV_GANG_UNSCHEDULABLE, exit_code=None,
                      message=why, time=ctx.now, attempt=st.attempts)
    ctx.plan.requeue(timeout)
    return replace(st, state=transition(st.state, Event.PREEMPT), last_failure=failure,
                   next_attempt_at=ctx.now + timedelta(seconds=timeout))
