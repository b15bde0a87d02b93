"""In-place gang recovery (``recovery.gangRestart: Member``): replace only the lost members.

When members of a running gang end (preempted, evicted, their node lost, killed, failed)
while others are still live, the loss is charged as for a whole gang (``attempts.account``:
one preemption or failure, naming the member that ended it), but the survivors keep their
pods: only the lost members get new pods. The gang becomes the next attempt: the fence moves
to it (invariant 1: a lost member left running on a partitioned node is superseded by the
number, exactly like a whole gang's old attempt), and names the pod serving each member and
the attempt's rendezvous store (``plan.GangFence`` -> ``handshake.Fence.members``/``store``).
A survivor's trainer, whose collectives failed when it lost its peer, finds itself named in
that fence, re-executes into the new attempt's process group and, for replicated state,
hands the newcomers the state it holds (``phoenix_trainer.rejoin``).

The status remembers which attempt's pod serves each member (``PhaseStatus.members``), so
the current gang is found again after an operator restart (``plan.gang_pods``); a status
written (intent first) whose new pods were never created gets exactly the missing members'
pods, never a second pod for a survivor.

With ``recovery.standby`` the gang keeps one spare pod (``decide.standby``): the first lost
member's place goes to it rather than to a new pod (``usable_spare``). The fence names the
spare's pod for that member (it waits for exactly that), the status remembers that a former
spare serves it (``PhaseStatus.spare_members``, ``plan.with_spares``); with no other pod to
create the fence is written before the status, like a standby's promotion, and an operator
that stopped in between finds its own fence and names the same attempt again.

A member the operator stopped itself to move it off a straggler's node (``decide.hangs``,
``recovery.onStraggler: Replace``) is replaced the same way, off that node, and counted as a
move (``stragglerMoves``), not charged.

Falls back to the whole-gang restart: when a member completed (the gang is finishing), when
no member survives, when a survivor was not started to rejoin (a promoted standby gang runs
torchrun's own multi-node rendezvous; pods from before ``gangRestart`` was changed), when the
budget is spent (the phase fails), and while suspending.
Pure, like the rest of ``decide``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from .. import constants as C
from ..constants import Cause, PhaseState
from ..outcomes import Outcome
from ..phoenixjob import PhaseSpec, PhaseStatus, Replacement, StandbyRef
from ..podspec import (build_pod, gang_store, in_place_gang, member_of, pod_name,
                       spare_hostname, spare_pod_name)
from ..states import Event, transition
from .attempts import account, fence_floor, resume_point
from .plan import CreatePod, Ctx, GangFence, Pods, Promote
from .standby import usable_spare
from phoenix_trainer.core.contract import ENV_GANG_RESTART, GANG_RESTART_MEMBER

MOVED = "move"  # a Replacement's cause when the operator moved a straggler (not a loss)


def replaceable(ctx: Ctx, phase: PhaseSpec, members: Sequence[Mapping[str, Any]],
                live: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a gang whose attempt just ended can keep its ``live`` members: Member mode,
    at least one survivor, and no member that completed (a gang finishing ends as a unit)."""
    if not in_place_gang(ctx.spec, phase) or not live or ctx.spec.suspend:
        return False
    if not all(_joins_in_place(p) for p in live):
        return False  # e.g. a promoted standby gang, or pods from before gangRestart changed
    survivors = {p["metadata"]["name"] for p in live}
    return not any(ctx.outcome(p).cause == Cause.COMPLETED for p in members
                   if p["metadata"]["name"] not in survivors)


def _joins_in_place(pod: Mapping[str, Any]) -> bool:
    """Whether the pod's trainer was started to rejoin (torchrun standalone, Phoenix's group)."""
    return any(e.get("name") == ENV_GANG_RESTART and e.get("value") == GANG_RESTART_MEMBER
               for c in (pod.get("spec") or {}).get("containers") or ()
               for e in c.get("env") or ())


def member_pod(job: str, phase: str, st: PhaseStatus, member: int) -> str:
    """The name of the pod serving ``member`` of the current gang (a former spare's, or the
    member's own of the attempt that serves it)."""
    a = st.member_attempt(member)
    return spare_pod_name(job, phase, a) if member in st.spare_members else \
        pod_name(job, phase, a, member)


def replace_lost(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, outcome: Outcome,
                 culprit: Mapping[str, Any] | None, live: Sequence[Mapping[str, Any]],
                 members: Sequence[Mapping[str, Any]] = (), pods: Pods | None = None
                 ) -> PhaseStatus:
    """Charge the loss like a gang's end, then replace the members that are not ``live``
    (the phase fails instead once its budget is spent): the first by the spare when one
    can take it (``members``: the gang's pods, ``pods``: the phase's, to find them)."""
    name = culprit["metadata"]["name"] if culprit is not None else None
    survivors = sorted(member_of(p) for p in live)
    lost = [m for m in range(phase.replicas) if m not in survivors]
    lost_pods = tuple(member_pod(ctx.job, phase.name, st, m) for m in lost)
    lost_nodes = [n for p in members if member_of(p) in lost
                  if (n := (p.get("spec") or {}).get("nodeName"))]
    spare = usable_spare(ctx, st, pods or {}, lost_nodes)
    move = st.last_move
    if move is not None and move.attempt == st.attempts and lost_pods == (move.pod,):
        # the operator stopped this straggler's pod itself: a move, not a loss
        cause, reason = MOVED, C.R_STRAGGLER_MOVED
        charged = replace(st, state=transition(st.state, Event.PREEMPT),
                          straggler_moves=st.straggler_moves + 1)
    else:
        charged = account(ctx, phase, st, outcome, name, culprit)
        if charged.state != PhaseState.RECOVERING:  # budget spent: the phase is over
            ctx.delete_live(live, f"gang member {name} ended the phase")
            return charged
        last = charged.last_failure
        cause, reason = (last.cause, last.reason) if last else (outcome.cause.value, outcome.reason)
    st = start_members(ctx, phase, charged, lost, survivors, charged=cause != MOVED,
                       spare=spare)
    if st.state != PhaseState.RUNNING:
        return st  # listings needed, or the prefix is held: decided again later
    st = replace(st, replacements=st.replacements + 1, last_replacement=Replacement(
        attempt=st.attempts, time=ctx.now, members=tuple(lost), lost=lost_pods,
        pods=tuple(member_pod(ctx.job, phase.name, st, m) for m in lost),
        cause=cause, reason=reason, spare=spare.pod if spare is not None else ""))
    ctx.note("Normal", C.EV_MEMBER_REPLACED,
             f"phase {phase.name}: {st.last_replacement.describe()}; members "
             f"{', '.join(map(str, survivors))} keep their pods and rejoin"
             + (f"; spare pod {spare.pod} ({'ready' if spare.ready else 'not ready yet'}) "
                f"took member {lost[0]}'s place, a new spare follows" if spare else ""))
    return st


def start_members(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, lost: Sequence[int],
                  survivors: Sequence[int], recreate: bool = False,
                  charged: bool = True, spare: StandbyRef | None = None) -> PhaseStatus:
    """Create pods for the ``lost`` members only: as the next attempt (the fence moves to
    it), or, ``recreate``, as the current one (its status was written, its pods were not
    all created). The store is hosted by the lowest surviving member. A member moved off a
    straggler's node (``st.last_move``) is kept off that node; ``charged``: the loss was
    accounted (a move is not; no time-to-replacement is observed for it). ``spare``: the
    phase's spare takes the first lost member's place instead of a new pod."""
    move = st.last_move
    moving = move is not None and move.node and move.member in lost and (
        move.attempt == st.attempts or (recreate and move.attempt < st.attempts))
    point = resume_point(ctx, phase, st)
    if point is None:
        return st
    st, chosen = point.st, point.chosen
    floor = fence_floor(ctx, phase, st, ctx.checkpoints[phase.name])
    if floor is None:
        return st
    taken = lost[0] if spare is not None and lost else None
    serving = [(spare.attempt if m == taken else None) if m in lost else st.member_attempt(m)
               for m in range(phase.replicas)]
    spares = tuple(sorted({m for m in st.spare_members if m not in lost}
                          | ({taken} if taken is not None else set())))
    new = [m for m in lost if m != taken]

    def names_for(attempt: int) -> tuple[str, ...]:
        at = [attempt if a is None else a for a in serving]
        return tuple(spare_pod_name(ctx.job, phase.name, a) if m in spares
                     else pod_name(ctx.job, phase.name, a, m) for m, a in enumerate(at))

    attempt = st.attempts if recreate else max(st.next_attempt_number, floor + 1)
    own = ctx.checkpoints[phase.name].fence
    if (not recreate and not new and own is not None and own.uid == ctx.uid
            and own.attempt > st.attempts and own.members == names_for(own.attempt)):
        # This take-over's fence was written, its status was not (the operator stopped in
        # between): the same attempt again, not one that would move the rejoined gang on.
        attempt = own.attempt
    serving = [attempt if a is None else a for a in serving]
    names = names_for(attempt)
    store_member = min(survivors) if survivors else 0
    host = spare_hostname(phase.name, serving[store_member]) if store_member in spares else None
    gang = GangFence(names, gang_store(ctx.job, ctx.namespace, phase.name, store_member, attempt,
                                       host), store_member)
    resume = chosen.uri if chosen else None
    previous = st.last_failure if charged and not recreate else None
    if taken is not None and not new:  # nothing to create: the fence alone moves the gang
        assert spare is not None
        ctx.plan.promote.append(Promote(
            phase=phase.name, attempt=attempt, pod=spare.pod, resume_from=resume,
            previous_end=previous.time if previous else None,
            previous_cause=previous.cause if previous else None, gang=gang))
    for i, m in enumerate(new):
        manifest = build_pod(job=ctx.job, namespace=ctx.namespace, spec=ctx.spec, phase=phase,
                             attempt=attempt, resume_from=resume,
                             resume_step=chosen.step if chosen else None,
                             init_from=point.init.uri if point.init else None, member=m,
                             job_uid=ctx.uid, store_member=store_member, store_host=host,
                             avoid=[move.node] if moving and m == move.member else ())
        ctx.plan.create.append(CreatePod(
            name=manifest["metadata"]["name"], phase=phase.name, attempt=attempt,
            manifest=manifest, resume_from=resume,
            previous_end=previous.time if previous and i == 0 else None,
            previous_cause=previous.cause if previous and i == 0 else None, gang=gang))
    if recreate:
        ctx.note("Normal", C.EV_POD_CREATED,
                 f"phase {phase.name}: created {', '.join(names[m] for m in new)} (attempt "
                 f"{attempt}), the members the gang was missing")
    event = Event.RECREATE if recreate else Event.REPLACE
    return replace(st, state=transition(st.state, event), attempts=attempt, pod=names[0],
                   pod_uid=None, resume_from=resume, next_attempt_at=None,
                   members=tuple(serving), spare_members=spares,
                   standby=None if taken is not None else st.standby,
                   last_attempt=max(st.last_attempt, attempt))


def recovered(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus) -> PhaseStatus:
    """Fill the last replacement's outcome from the new attempt's heartbeats, once every
    rank reports its first step after the restore: where the state came from, the step,
    and the seconds from the loss (the lost member's end) to the last rank's first step."""
    r = st.last_replacement
    prog = ctx.progress.get(phase.name)
    if r is None or r.attempt != st.attempts or r.training_again_seconds is not None \
            or prog is None or prog.error or prog.attempt != st.attempts:
        return st
    ranks = prog.ranks
    if len(ranks) < phase.replicas * (phase.nproc_per_node or 1) \
            or any(x.training_since is None for x in ranks):
        return st
    lost_at = st.last_failure.time if st.last_failure is not None else r.time
    sources = sorted({x.restored_from for x in ranks if x.restored_from})
    steps = [x.restored_step for x in ranks if x.restored_step is not None]
    again = max(x.training_since for x in ranks) - lost_at.timestamp()
    return replace(st, last_replacement=replace(
        r, recovered_from="+".join(sources), resumed_step=min(steps) if steps else None,
        training_again_seconds=max(0.0, again)))
