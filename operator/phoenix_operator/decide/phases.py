"""The per-phase state machine as a dispatch table: one handler per ``PhaseState``.

One phase's decision has three steps, each a table lookup on the phase's state:

1. Pods on a lost node are force-deleted whatever the state (nothing runs them any more).
2. *Catch up* with the cluster (``CATCH_UP``): account the recorded attempt if it ended,
   adopt pods the status does not know yet (a status write lost after a pod was created).
   Each round either changes the state (and the next round looks again) or stops; bounded
   by the number of pods.
3. *Act* on the state caught up to (``HANDLERS``): start, replace, keep a standby, resume,
   or nothing. A suspended job is handled before the table (every live state suspends).

The legal transitions themselves are ``states.TRANSITIONS``; handlers change the state only
through ``states.transition``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping

from .. import constants as C
from ..constants import Cause, PhaseState
from ..outcomes import Outcome
from ..phoenixjob import PhaseSpec, PhaseStatus
from ..podspec import member_of
from ..states import Event, is_terminal, transition
from .attempts import account, adopt, attempt_outcome, checkpoint_from, start_attempt
from .gangs import gang_scheduled_in_time
from .hangs import watch
from .members import recovered, replaceable, replace_lost, start_members
from .plan import (CONFLICT_RETRY_SECONDS, Ctx, DeletePod, Pods, gang_pods, is_standby_pod,
                   with_spares)
from .standby import (cannot_take_over, create_standby, drop_standby, live_standby, promote,
                      standby_and_notice)

S = PhaseState
Statuses = Mapping[str, PhaseStatus]


def decide_phase(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods,
                 statuses: Statuses) -> PhaseStatus:
    """The phase's next status (and its part of ``ctx.plan``); ``statuses``: every phase's,
    as decided so far in spec order (a dependency decided in this pass counts)."""
    pods = with_spares(pods, st)
    if not is_terminal(st.state):
        _force_delete_lost(ctx, pods)
        st = _catch_up(ctx, phase, st, pods)
        pods = with_spares(pods, st)  # a spare that took a place in this pass
        if ctx.spec.suspend and not is_terminal(st.state):
            return _suspend(ctx, phase, drop_standby(ctx, st, pods, "the job is suspended"), pods)
    return HANDLERS[st.state](ctx, phase, st, pods, statuses)


def _force_delete_lost(ctx: Ctx, pods: Pods) -> None:
    """Pods on a lost node look live until pod GC removes them (tens of seconds); nothing runs
    them any more, so delete them now, without grace, whatever the phase's state."""
    for pod in (p for members in pods.values() for p in members):
        lost = ctx.outcome(pod)
        if lost.force:
            ctx.plan.delete.append(DeletePod(pod["metadata"]["name"], 0, lost.reason,
                                             force=True))


# --- 2. catch up: (status, look again?) per state -----------------------------------------

def _catch_up(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    """Bounded: each round either changes the state or stops."""
    for _ in range(2 * len(pods) + 2):
        step = CATCH_UP.get(st.state)
        if step is None:
            break
        st, again = step(ctx, phase, st, pods)
        if not again:
            break
    return st


def _catch_up_running(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus,
                      pods: Pods) -> tuple[PhaseStatus, bool]:
    """The recorded attempt: created in full? still live? If it ended, account it (and
    look again: a newer pod may be waiting to be adopted)."""
    members = gang_pods(pods, st, phase.replicas)
    if len(members) < phase.replicas and st.pod_uid is None:
        if not members and st.pod in ctx.foreign:
            _conflict(ctx, phase, st.pod, ctx.foreign[st.pod])
            return st, False
        if st.members and not ctx.spec.suspend:  # an in-place replacement's missing pods
            present = sorted(member_of(p) for p in members)
            return start_members(ctx, phase, st, [m for m in range(phase.replicas)
                                                   if m not in present], present,
                                 recreate=True), False
        # Status was written (intent) but the pods never all got created: the operator
        # stopped in between. Create them now, same attempt, same names (a promoted standby
        # gang's as standbys: their hostnames, and the fence already names them).
        if any(is_standby_pod(p) for p in members):
            create_standby(ctx, phase, st, st.attempts, pods)
        elif not ctx.spec.suspend:
            st = start_attempt(ctx, phase, st, Event.RECREATE)
        return st, False
    outcome, culprit, live = attempt_outcome(ctx, phase, st, members)
    if outcome.live:
        uid = members[0].get("metadata", {}).get("uid") if members else None
        if uid and st.pod_uid is None:
            st = replace(st, pod_uid=uid)
        if phase.replicas > 1:
            st = gang_scheduled_in_time(ctx, phase, st, members)
        return st, False
    if outcome.delete and not outcome.force and culprit is not None:
        ctx.plan.delete.append(DeletePod(
            culprit["metadata"]["name"], ctx.spec.recovery.grace_seconds, outcome.reason))
    if phase.replicas > 1 and replaceable(ctx, phase, members, live):
        return replace_lost(ctx, phase, st, outcome, culprit, live, members, pods), False
    name = culprit["metadata"]["name"] if culprit is not None else None
    ctx.delete_live(live, f"gang member {name} ended the attempt")
    return account(ctx, phase, st, outcome, name, culprit), True


def _catch_up_waiting(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus,
                      pods: Pods) -> tuple[PhaseStatus, bool]:
    """Pending or recovering: a pod newer than the status is adopted, never duplicated. (A
    standby's pods are newer too, but the status always knew them: never adopted.)"""
    newer = [a for a in pods if a > st.attempts and not is_standby_pod(pods[a][0])]
    if newer and not ctx.spec.suspend:
        return adopt(ctx, phase, st, max(newer), pods[max(newer)][0]), True
    return st, False


CatchUp = Callable[[Ctx, PhaseSpec, PhaseStatus, Pods], "tuple[PhaseStatus, bool]"]
CATCH_UP: dict[PhaseState, CatchUp] = {
    S.RUNNING: _catch_up_running,
    S.RECOVERING: _catch_up_waiting,
    S.PENDING: _catch_up_waiting,
}


# --- 3. act on the state ----------------------------------------------------------------

def _pending(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods,
             statuses: Statuses) -> PhaseStatus:
    """Start once the dependencies allow it; block when one failed (unless independent)."""
    deps = [statuses[d] for d in phase.depends_on if d in statuses]
    if phase.independent:
        if all(is_terminal(d.state) for d in deps):
            return start_attempt(ctx, phase, st, Event.START)
        return st
    broken = [d.name for d in deps if d.state in (S.FAILED, S.BLOCKED)]
    if broken:
        ctx.note("Warning", C.EV_PHASE_BLOCKED,
                 f"phase {phase.name} will not run: dependency {', '.join(broken)} failed")
        return replace(st, state=transition(st.state, Event.BLOCK), completed_at=ctx.now)
    if all(d.state == S.SUCCEEDED for d in deps):
        return start_attempt(ctx, phase, st, Event.START)
    return st


def _running(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods,
             statuses: Statuses) -> PhaseStatus:
    return watch(ctx, phase, recovered(ctx, phase, standby_and_notice(ctx, phase, st, pods)), pods)


def _recovering(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods,
                statuses: Statuses) -> PhaseStatus:
    """The attempt ended: once its backoff is over, promote the standby if it can take over,
    else start a fresh attempt once the old pods are gone (never two live trainer pods)."""
    if st.standby is not None and st.standby.reason == C.SPARE:  # no member left to spare
        st = drop_standby(ctx, st, pods, "the gang restarts whole")
    if st.next_attempt_at is not None and ctx.now < st.next_attempt_at:
        ctx.plan.requeue((st.next_attempt_at - ctx.now).total_seconds())
        return st
    standby = live_standby(ctx, phase, st, pods)
    if standby is not None:
        why = cannot_take_over(ctx, phase, st, pods)
        if why is None:
            return promote(ctx, phase, st, standby)
        ctx.note("Warning", C.EV_STANDBY_LOST, f"phase {phase.name}: standby {standby.pod} "
                 f"cannot take over: {why}; starting a fresh attempt instead")
        st = drop_standby(ctx, st, pods, why)
    if st.standby is not None:
        st = replace(st, standby=None)  # it ended too; a new attempt is created below
    old_live = [p for a, members in pods.items() if a <= st.attempts for p in members
                if ctx.outcome(p).live]
    if old_live:
        if phase.replicas > 1:  # a gang's peers, should a delete have been lost
            ctx.delete_live(old_live, "the gang's attempt is over")
        return st  # never two live trainer pods: wait for the old ones to be gone
    return start_attempt(ctx, phase, st, Event.REPLACE)


def _suspended(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods,
               statuses: Statuses) -> PhaseStatus:
    """``spec.suspend`` cleared: once the old pods are gone, recover (a new attempt)."""
    st = _unsuspend(ctx, phase, st, pods)
    if st.state == S.RECOVERING:
        return _recovering(ctx, phase, st, pods, statuses)
    return st


def _over(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods,
          statuses: Statuses) -> PhaseStatus:
    return drop_standby(ctx, st, pods, "the phase is over")


Handler = Callable[[Ctx, PhaseSpec, PhaseStatus, Pods, Statuses], PhaseStatus]
HANDLERS: dict[PhaseState, Handler] = {
    S.PENDING: _pending,
    S.RUNNING: _running,
    S.RECOVERING: _recovering,
    S.SUSPENDED: _suspended,
    S.SUCCEEDED: _over,
    S.FAILED: _over,
    S.BLOCKED: _over,
}
assert set(HANDLERS) == set(PhaseState), "every phase state needs a handler"


# --- a foreign pod; suspension ----------------------------------------------------------

def _conflict(ctx: Ctx, phase: PhaseSpec, name: str, owner: str) -> None:
    """The name of this attempt's pod is taken by a pod we do not own: never adopt, delete
    or retry it in a loop; say so (condition + one event) and look again later."""
    ctx.conflicts.append(
        f"phase {phase.name}: pod {ctx.namespace}/{name} exists and is not owned by this "
        f"PhoenixJob ({owner}); Phoenix will neither adopt nor delete it. Delete or rename it "
        f"and attempt {name.rsplit('-', 1)[-1]} starts; looking again every "
        f"{CONFLICT_RETRY_SECONDS:g}s")
    ctx.plan.requeue(CONFLICT_RETRY_SECONDS)


def _suspend(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    grace = ctx.spec.recovery.grace_seconds
    members = gang_pods(pods, st, phase.replicas)
    if st.state in (S.RUNNING, S.RECOVERING):
        ctx.note("Normal", C.EV_SUSPENDING,
                 f"phase {phase.name}: job suspended"
                 + (f"; deleting pod {st.pod} with {grace}s grace" if st.state == S.RUNNING else ""))
        st = replace(st, state=transition(st.state, Event.SUSPEND), next_attempt_at=None)
    if st.state != S.SUSPENDED or not members:
        return st
    outcome, _, live = attempt_outcome(ctx, phase, st, members)
    if live:
        ctx.delete_live(live, "suspend", grace)
        return st
    st = replace(st, last_checkpoint=checkpoint_from(outcome, st, outcome.finished_at or ctx.now))
    if outcome.cause == Cause.COMPLETED:
        return _account_suspended_success(ctx, phase, st, outcome)
    return st


def _account_suspended_success(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus,
                               outcome: Outcome) -> PhaseStatus:
    ctx.note("Normal", C.EV_PHASE_SUCCEEDED,
             f"phase {phase.name} succeeded in pod {st.pod} while the job was suspending")
    return replace(st, state=transition(st.state, Event.SUCCEED),
                   completed_at=outcome.finished_at or ctx.now)


def _unsuspend(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    members = gang_pods(pods, st, phase.replicas)
    if members:
        outcome, _, live = attempt_outcome(ctx, phase, st, members)
        if live:
            return st  # still terminating; its end will trigger us again
        st = replace(st, last_checkpoint=checkpoint_from(
            outcome, st, outcome.finished_at or ctx.now))
        if outcome.cause == Cause.COMPLETED:
            return _account_suspended_success(ctx, phase, st, outcome)
    ctx.note("Normal", C.EV_RESUMED, f"phase {phase.name}: job resumed; starting a new attempt")
    return replace(st, state=transition(st.state, Event.RESUME), next_attempt_at=None)


