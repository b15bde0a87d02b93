"""Standbys and notices. A standby is the phase's next attempt started ahead of need: its
pods are created but the storage fence is not moved, so they wait; when the active attempt
ends the standby is *promoted* (one fence write names its attempt and the checkpoint to
resume from). A *notice* (a reclaim announced on the active pod's node) asks the trainer for
a checkpoint now (``control.json``) and, with ``onNotice: Handoff``, for a handoff to a ready
standby. A failing standby is retried with backoff and a cap (invariant 3, ``standby_failed``).

An in-place gang (``gangRestart: Member``) keeps a *spare* instead of a standby gang: one pod
(``create_spare``), required off the members' nodes, that knows no member index while it
waits; when members are lost, ``decide.members`` gives it the first lost member's place
(``usable_spare``) and a new spare is started once the gang trains again. A spare lost while
waiting is replaced like a lost standby (``_sync_spare``), never charged to the gang; one
that a member's new pod came to share a node with is moved off it.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

from .. import constants as C
from ..constants import Cause
from phoenix_trainer.core.handshake import Control
from ..phoenixjob import Notice, PhaseSpec, PhaseStatus, StandbyRef, ts
from ..podspec import build_pod, build_service, in_place_gang, member_of, pod_name, spare_pod_name
from ..states import Event, transition
from .attempts import describe, resume_point
from .gangs import unscheduled_past_timeout
from .plan import (ControlWrite, CreatePod, Ctx, Pods, Promote, gang_pods, is_spare_pod,
                   is_standby_pod, pod_ready)


def _standby_members(st: PhaseStatus, pods: Pods) -> list[Mapping[str, Any]]:
    """Pods of attempts newer than the active one: standbys (the current one, or ones being
    removed). They never wrote: the fence never named them. Plus the recorded spare's pod,
    whose reserved number a replacement that did not use it (it was still Pending) passed."""
    out = [p for a, members in pods.items() if a > st.attempts for p in members]
    sb = st.standby
    if sb is not None and sb.reason == C.SPARE and sb.attempt <= st.attempts:
        out += [p for p in pods.get(sb.attempt, ()) if is_spare_pod(p)]
    return out


def drop_standby(ctx: Ctx, st: PhaseStatus, pods: Pods, why: str) -> PhaseStatus:
    """Delete every live standby pod of the phase and forget the standby."""
    live = [p for p in _standby_members(st, pods) if ctx.outcome(p).live]
    ctx.delete_live(live, f"standby no longer needed: {why}")
    return replace(st, standby=None) if st.standby is not None else st


def live_standby(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> StandbyRef | None:
    """The recorded standby if its pods are live (a gang: every member), or not all created
    yet (intent written: the missing members are created once it is promoted)."""
    sb = st.standby
    if sb is None:
        return None
    members = pods.get(sb.attempt, ())
    if len(members) < phase.replicas and sb.pod_uid is not None:
        return None  # a member it had is gone
    for pod in members:
        if not ctx.outcome(pod).live or (pod.get("metadata") or {}).get("deletionTimestamp"):
            return None
    first = members[0] if members and member_of(members[0]) == 0 else None
    uid = first["metadata"].get("uid") if first is not None else None
    return replace(sb, pod_uid=sb.pod_uid or (uid if len(members) >= phase.replicas else None))


def cannot_take_over(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> str | None:
    """Why the live standby's pods could not train if promoted, or None: each must be bound
    to a node that is Ready and announced no reclaim. A Pending standby (no capacity, still
    kept off the old node) or one on a NotReady node would strand the phase there; a fresh
    attempt may go anywhere."""
    assert st.standby is not None
    for pod in pods.get(st.standby.attempt, ()):
        name = pod["metadata"]["name"]
        node = (pod.get("spec") or {}).get("nodeName")
        if not node:
            return f"pod {name} is not scheduled"
        health = ctx.nodes.get(node)
        if health is not None and not health.healthy:
            return f"pod {name}'s node {node} is not Ready"
        if health is not None and health.notice:
            return f"pod {name}'s node {node} announced its reclaim ({health.notice})"
    return None


def promote(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, sb: StandbyRef) -> PhaseStatus:
    """The active attempt is over: the standby takes over (the fence moves to it). A gang is
    promoted as a unit: one fence write names its attempt, and every member reads it."""
    point = resume_point(ctx, phase, st)
    if point is None:
        return st
    st, chosen = point.st, point.chosen
    resume = chosen.uri if chosen else None
    previous = st.last_failure
    ctx.plan.promote.append(Promote(
        phase=phase.name, attempt=sb.attempt, pod=sb.pod, resume_from=resume,
        previous_end=previous.time if previous else None,
        previous_cause=previous.cause if previous else None))
    where = f"resuming from step {chosen.step} ({resume})" if chosen else "starting fresh"
    what = f"standby pod {sb.pod}" if phase.replicas == 1 else \
        f"standby gang of {phase.replicas} pods {sb.pod}..{phase.replicas - 1}"
    ctx.note("Normal", C.EV_PROMOTED,
             f"phase {phase.name}: {what} (attempt {sb.attempt}, "
             f"{'ready' if sb.ready else 'not ready yet'}) takes over, {where}")
    return replace(st, state=transition(st.state, Event.REPLACE), attempts=sb.attempt,
                   pod=sb.pod, pod_uid=sb.pod_uid, resume_from=resume, next_attempt_at=None,
                   standby=None, promotions=st.promotions + 1,
                   last_attempt=max(st.last_attempt, sb.attempt))


def _sync_standby(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    """Bring ``status.standby`` up to date with its pods: created, scheduled, ready, lost.
    A standby gang is one unit: lost when any member ends (the rest are deleted), released
    when not all scheduled within gangScheduleTimeoutSeconds, ready when every member is."""
    sb = st.standby
    if sb is None:
        return st
    if sb.reason == C.SPARE:
        return _sync_spare(ctx, phase, st, pods)
    what = f"standby pod {sb.pod}" if phase.replicas == 1 else f"standby gang {sb.pod}.."
    members = pods.get(sb.attempt, ())
    if len(members) < phase.replicas:
        if sb.pod_uid is None:  # intent written, pods not (all) created (operator restarted)
            create_standby(ctx, phase, st, sb.attempt, pods)
            return st
        ctx.note("Normal", C.EV_STANDBY_LOST, f"phase {phase.name}: {what} lost a pod: "
                 f"{phase.replicas - len(members)} of {phase.replicas} gone" if members else
                 f"phase {phase.name}: {what} is gone")
        ctx.delete_live([p for p in members if ctx.outcome(p).live], "the standby gang is lost")
        return replace(st, standby=None)
    for pod in members:
        outcome = ctx.outcome(pod)
        if not outcome.live:
            ctx.delete_live([p for p in members if ctx.outcome(p).live],
                         "the standby gang is lost")
            lost = (f"phase {phase.name}: {what} ended before it was needed: pod "
                    f"{pod['metadata']['name']} {describe(outcome)}")
            if outcome.cause != Cause.FAILURE:  # preempted: not its fault, replaced at once
                ctx.note("Normal", C.EV_STANDBY_LOST, lost)
                return replace(st, standby=None)
            return standby_failed(ctx, phase, replace(st, standby=None), lost)
    for pod in members:
        node = (pod.get("spec") or {}).get("nodeName")
        health = ctx.nodes.get(node) if node else None
        if health is not None and health.notice:
            ctx.note("Normal", C.EV_STANDBY_LOST,
                     f"phase {phase.name}: {what}'s node {node} announced its reclaim"
                     f" ({health.notice}); replacing the standby")
            ctx.delete_live(members, f"standby's node {node} announced its reclaim")
            return replace(st, standby=None)
    if phase.replicas > 1:
        released = _standby_gang_scheduled_in_time(ctx, phase, st, members)
        if released is not None:
            return released
    node = (members[0].get("spec") or {}).get("nodeName")
    ready_members = sum(1 for p in members if pod_ready(p))
    ready = ready_members == len(members)
    if ready:
        st = replace(st, standby_failures=0)  # it works: earlier failures were not the template
    if ready and not sb.ready:
        ctx.note("Normal", C.EV_STANDBY_READY,
                 f"phase {phase.name}: {what} on {node} is ready (model built,"
                 f" newest checkpoint loaded) {_seconds(ctx.now, sb.since)} after it was started")
    return replace(st, standby=replace(sb, pod_uid=members[0]["metadata"].get("uid"), node=node,
                                       ready=ready, members=phase.replicas,
                                       ready_members=ready_members))


def _sync_spare(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    """Bring a spare's ``status.standby`` up to date with its pod: created, scheduled, ready,
    lost (replaced at once when preempted, with backoff when it failed: ``standby_failed``),
    on a node that announced its reclaim or that a member's pod now shares (moved)."""
    sb = st.standby
    assert sb is not None
    spare = [p for p in pods.get(sb.attempt, ()) if is_spare_pod(p)]
    if not spare:
        if sb.pod_uid is None:  # intent written, pod not created (operator restarted)
            create_spare(ctx, phase, st, sb.attempt, pods)
            return st
        ctx.note("Normal", C.EV_STANDBY_LOST, f"phase {phase.name}: spare pod {sb.pod} is gone;"
                 " starting another")
        return replace(st, standby=None)
    pod = spare[0]
    outcome = ctx.outcome(pod)
    if not outcome.live:
        lost = (f"phase {phase.name}: spare pod {sb.pod} ended before it was needed: "
                f"{describe(outcome)}")
        if outcome.cause != Cause.FAILURE:  # preempted: not its fault, replaced at once
            ctx.note("Normal", C.EV_STANDBY_LOST, lost + "; starting another")
            return replace(st, standby=None)
        return standby_failed(ctx, phase, replace(st, standby=None), lost)
    node = _node(pod)
    health = ctx.nodes.get(node) if node else None
    shared = [member_of(p) for p in gang_pods(pods, st, phase.replicas) if node and _node(p) == node]
    if (health is not None and health.notice) or shared:
        why = (f"its node {node} announced its reclaim ({health.notice})"
               if health is not None and health.notice else
               f"member {shared[0]}'s pod now runs on its node {node}")
        ctx.note("Normal", C.EV_STANDBY_LOST, f"phase {phase.name}: spare pod {sb.pod}: {why};"
                 " moving it off the members' nodes")
        ctx.delete_live([pod], f"spare moved: {why}")
        return replace(st, standby=None)
    ready = pod_ready(pod)
    if ready:
        st = replace(st, standby_failures=0)
    if ready and not sb.ready:
        ctx.note("Normal", C.EV_STANDBY_READY,
                 f"phase {phase.name}: spare pod {sb.pod} on {node} is ready (waiting for a "
                 f"member's place) {_seconds(ctx.now, sb.since)} after it was started")
    return replace(st, standby=replace(sb, pod_uid=pod["metadata"].get("uid"), node=node,
                                       ready=ready))


def usable_spare(ctx: Ctx, st: PhaseStatus, pods: Pods, lost_nodes: Sequence[str]
                 ) -> StandbyRef | None:
    """The phase's spare if it can take a lost member's place now: live, bound to a Ready
    node that announced no reclaim and that no lost member ran on (a spare still Pending is
    kept for a later loss; the lost members get new pods, which may go anywhere)."""
    sb = st.standby
    if sb is None or sb.reason != C.SPARE:
        return None
    spare = [p for p in pods.get(sb.attempt, ()) if is_spare_pod(p)]
    if not spare or (spare[0].get("metadata") or {}).get("deletionTimestamp"):
        return None
    node = _node(spare[0])
    health = ctx.nodes.get(node) if node else None
    if not node or node in lost_nodes or not ctx.outcome(spare[0]).live or (
            health is not None and (not health.healthy or health.notice)):
        return None
    return replace(sb, pod_uid=spare[0]["metadata"].get("uid"), node=node)


def create_spare(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, attempt: int, pods: Pods) -> str:
    """Plan an in-place gang's spare member for the reserved ``attempt``; returns its name.
    Required off every member's node (it is there to survive losing one: on a member's node
    it would be lost with it), and preferably off nodes that announced a reclaim; with no
    such node free it stays Pending, costing nothing, until one is."""
    noticed = sorted(n for n, h in ctx.nodes.items() if h.notice)
    active = sorted({n for p in gang_pods(pods, st, phase.replicas) if (n := _node(p))})
    dep = ctx.checkpoints.get(phase.depends_on[0]) if phase.depends_on else None
    init = dep.newest_valid() if dep is not None else None
    ctx.plan.services.append(build_service(job=ctx.job, namespace=ctx.namespace,
                                           phase=phase.name))
    manifest = build_pod(job=ctx.job, namespace=ctx.namespace, spec=ctx.spec, phase=phase,
                         attempt=attempt, resume_from=None, resume_step=None,
                         init_from=init.uri if init else None, spare=True, avoid=active,
                         prefer_not=noticed, job_uid=ctx.uid)
    ctx.plan.create.append(CreatePod(name=manifest["metadata"]["name"], phase=phase.name,
                                     attempt=attempt, manifest=manifest, resume_from=None,
                                     previous_end=None, previous_cause=None, standby=True))
    return spare_pod_name(ctx.job, phase.name, attempt)


def _standby_gang_scheduled_in_time(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus,
                                    members: Sequence[Mapping[str, Any]]) -> PhaseStatus | None:
    """As for an active gang (``gang_scheduled_in_time``): a standby gang not all bound
    within the timeout releases its pods; the next one is started after the same time.
    Returns the status after a release, None while it may still be scheduled."""
    assert st.standby is not None
    waiting = unscheduled_past_timeout(ctx, members, st.standby.since)
    if not waiting:
        return None
    timeout = ctx.spec.recovery.gang_schedule_timeout
    ctx.note("Warning", C.EV_STANDBY_LOST,
             f"phase {phase.name}: standby gang: {len(waiting)} of {phase.replicas} pods "
             f"({', '.join(waiting)}) not scheduled within gangScheduleTimeoutSeconds="
             f"{timeout:g}; released its pods, starting another in {timeout:g}s")
    ctx.delete_live(members, "standby gang not schedulable in time")
    ctx.plan.requeue(timeout)
    return replace(st, standby=None, standby_retry_at=ctx.now + timedelta(seconds=timeout))


def _seconds(now: datetime, since: datetime) -> str:
    return f"{max(0.0, (now - since).total_seconds()):.0f}s"


def _node(pod: Mapping[str, Any]) -> str | None:
    return (pod.get("spec") or {}).get("nodeName")


def create_standby(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, attempt: int,
                    pods: Pods) -> str:
    """Plan the standby's pods (a gang: every member not there yet); returns member 0's name.

    Where: a single standby is required off the active pod's node (it is there to survive
    that node) and preferably off nodes that announced a reclaim (a hard rule would strand it
    once a reclaimed node returns under the same name). A standby gang is required off only
    the active members' nodes that announced a reclaim, and preferably off the others and
    every noticed node: requiring it off every node of the active gang would leave a small
    cluster (two spot nodes, a gang of two) no room for it at all; a member that does share a
    node with the active gang is lost with it, and replaced."""
    noticed = sorted(n for n, h in ctx.nodes.items() if h.notice)
    active = [n for p in gang_pods(pods, st, phase.replicas) if (n := _node(p))]
    if phase.replicas == 1:
        avoid, prefer_not = active[:1], noticed
    else:
        avoid = sorted({n for n in active if n in noticed})
        prefer_not = sorted(set(active) | set(noticed))
    dep = ctx.checkpoints.get(phase.depends_on[0]) if phase.depends_on else None
    init = dep.newest_valid() if dep is not None else None
    have = {member_of(p) for p in pods.get(attempt, ())}
    members: list[int | None] = list(range(phase.replicas)) if phase.replicas > 1 else [None]
    if phase.replicas > 1:
        ctx.plan.services.append(build_service(job=ctx.job, namespace=ctx.namespace,
                                               phase=phase.name))
    for member in members:
        if (member or 0) in have:
            continue
        manifest = build_pod(job=ctx.job, namespace=ctx.namespace, spec=ctx.spec, phase=phase,
                             attempt=attempt, resume_from=None, resume_step=None,
                             init_from=init.uri if init else None, member=member, standby=True,
                             avoid=avoid, prefer_not=prefer_not, job_uid=ctx.uid)
        ctx.plan.create.append(CreatePod(name=manifest["metadata"]["name"], phase=phase.name,
                                         attempt=attempt, manifest=manifest, resume_from=None,
                                         previous_end=None, previous_cause=None, standby=True))
    return pod_name(ctx.job, phase.name, attempt, members[0])


def _notice(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pod: Mapping[str, Any] | None,
            handoff: bool) -> tuple[PhaseStatus, str | None]:
    """The notice on ``pod``'s node, if any and not ignored: recorded and the trainer asked
    to checkpoint now, once per attempt. Returns the status and the notice (or None)."""
    node = (pod.get("spec") or {}).get("nodeName") if pod is not None else None
    health = ctx.nodes.get(node) if node else None
    if health is None or not health.notice or ctx.spec.recovery.on_notice == C.ON_NOTICE_IGNORE:
        return st, None
    if st.last_notice is None or st.last_notice.attempt != st.attempts:
        st = replace(st, notices=st.notices + 1, last_notice=Notice(
            node=node, signal=health.notice, time=ctx.now, attempt=st.attempts))
        plan = ("checkpoint now, and hand off to a standby on another node"
                if handoff and not _advice(health.notice) else "checkpoint now")
        ctx.note("Warning", C.EV_NOTICE,
                 f"phase {phase.name}: node {node} of pod {pod['metadata']['name']} announced its"
                 f" reclaim ({health.notice}); asking the trainer to {plan}")
        ctx.plan.control.append(ControlWrite(phase.name, control(st, ctx.uid)))
    return st, health.notice


def standby_and_notice(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    """A running phase: keep its standby (a gang's: a standby gang) current, act on a notice
    on its node (a gang: on any member's node; every rank checkpoints at the same step)."""
    active = gang_pods(pods, st, phase.replicas)
    st = _sync_standby(ctx, phase, st, pods)
    _collect_ended_standbys(ctx, st, pods)
    rec = ctx.spec.recovery
    handoff = rec.on_notice == C.ON_NOTICE_HANDOFF
    notice = None
    for pod in active:
        st, notice = _notice(ctx, phase, st, pod, handoff)
        if notice:
            break
    if notice is not None and _advice(notice):
        notice, handoff = None, False  # checkpointed (control written); nothing else
    sb = st.standby
    if (notice is None and sb is not None and sb.reason == "notice" and not rec.standby
            and (st.last_notice is None or st.last_notice.handoff_to is None)):
        # The notice was withdrawn before the handoff was asked: the standby only cost a GPU.
        ctx.note("Normal", C.EV_STANDBY_LOST, f"phase {phase.name}: the notice on "
                 f"{st.last_notice.node if st.last_notice else 'its node'} was withdrawn; "
                 f"removing standby {sb.pod}")
        st = drop_standby(ctx, st, pods, "the notice was withdrawn")
    noticed = notice is not None and st.last_notice is not None
    bound = len(active) >= phase.replicas and all(_node(p) for p in active)
    # A kept standby waits until the active attempt trains (its pods Ready: restored), so it
    # never competes with that attempt's start; a notice does not wait.
    started = all(pod_ready(p) for p in active)
    # An in-place gang keeps a spare (one pod) rather than a standby gang; a notice there
    # asks for a checkpoint only: the spare takes the member's place once its node goes.
    spare = rec.standby and in_place_gang(ctx.spec, phase)
    r = st.last_replacement
    if spare and r is not None and r.attempt == st.attempts and r.training_again_seconds is None \
            and rec.hang_detection:
        # After a replacement the old pods still look Ready (a re-executing survivor's probe,
        # a former spare's from its wait): the gang trains again once every rank's heartbeat
        # says so (decide.members.recovered); the next spare waits until then.
        started = False
    if st.standby is None and bound and all(ctx.outcome(p).live for p in active) and (
            (rec.standby and (started or (noticed and not spare)))
            or (noticed and handoff and not spare)):
        if not _standby_failed_recently(ctx, st) and spare:
            attempt = st.next_attempt_number
            name = create_spare(ctx, phase, st, attempt, pods)
            st = replace(st, standby=StandbyRef(pod=name, attempt=attempt, reason=C.SPARE,
                                                since=ctx.now),
                         last_attempt=max(st.last_attempt, attempt), standby_retry_at=None)
            nodes = ", ".join(sorted({n for p in active if (n := _node(p))}))
            ctx.note("Normal", C.EV_STANDBY_STARTED, f"phase {phase.name}: started spare pod "
                     f"{name} (attempt {attempt}) off the members' nodes {nodes}; it takes the"
                     " place of the next member lost")
        elif not _standby_failed_recently(ctx, st):
            attempt = st.next_attempt_number
            reason = "notice" if noticed else "standby"
            name = create_standby(ctx, phase, st, attempt, pods)
            st = replace(st, standby=StandbyRef(pod=name, attempt=attempt, reason=reason,
                                                since=ctx.now, members=phase.replicas),
                         last_attempt=max(st.last_attempt, attempt), standby_retry_at=None)
            nodes = ", ".join(sorted({n for p in active if (n := _node(p))}))
            what = (f"standby pod {name} (attempt {attempt}) off node {nodes}"
                    if phase.replicas == 1 else
                    f"standby gang of {phase.replicas} pods {name}..{phase.replicas - 1} "
                    f"(attempt {attempt}) beside the active gang on {nodes}")
            ctx.note("Normal", C.EV_STANDBY_STARTED, f"phase {phase.name}: started {what}"
                     + (f", for the notice on {st.last_notice.node}" if noticed else ""))
    sb, last = st.standby, st.last_notice
    if (noticed and handoff and sb is not None and sb.ready and sb.reason != C.SPARE
            and last is not None and last.handoff_to is None):
        st = replace(st, last_notice=replace(last, handoff_to=sb.attempt))
        ctx.note("Normal", C.EV_HANDOFF,
                 f"phase {phase.name}: standby {sb.pod} is ready; asking pod {st.pod} to "
                 f"checkpoint at its next step and hand off to it")
        ctx.plan.control = [c for c in ctx.plan.control if c.phase != phase.name]
        ctx.plan.control.append(ControlWrite(phase.name, control(st, ctx.uid)))
    return st


def _advice(notice: str) -> bool:
    """A notice that only advises (``ADVISORY_NOTICE_TAINTS``): "taint <key>" as NodeHealth
    names it."""
    kind, _, key = notice.partition(" ")
    return kind == "taint" and key in C.ADVISORY_NOTICE_TAINTS


def control(st: PhaseStatus, uid: str) -> Control:
    """The control document for the phase's active attempt, from its status (idempotent:
    the same status gives the same document, so a lost write is simply made again)."""
    n = st.last_notice
    assert n is not None
    request = f"{n.signal} on {n.node} at {ts(n.time)}"
    pod = st.standby.pod if st.standby is not None and n.handoff_to == st.standby.attempt else ""
    return Control(attempt=st.attempts, checkpoint_now=request, handoff_to=n.handoff_to,
                   handoff_pod=pod, time=ts(n.time) or "", uid=uid)


def standby_failed(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, lost: str) -> PhaseStatus:
    """A standby failed (its own fault, not a preemption): the next one waits, doubling from
    STANDBY_RETRY_INITIAL_SECONDS; after MAX_STANDBY_FAILURES in a row none is kept for this
    attempt (StandbyGivenUp event, StandbyFailing condition)."""
    n = st.standby_failures + 1
    if n >= C.MAX_STANDBY_FAILURES:
        ctx.note("Warning", C.EV_STANDBY_GIVEN_UP,
                 f"{lost}; {n} standbys in a row failed before one became ready: keeping none "
                 "for this attempt (look at that pod's logs; the next attempt tries again)")
        return replace(st, standby_failures=n, standby_retry_at=None)
    delay = min(C.STANDBY_RETRY_INITIAL_SECONDS * 2 ** (n - 1), C.STANDBY_RETRY_MAX_SECONDS)
    ctx.note("Warning", C.EV_STANDBY_LOST,
             f"{lost}; a new standby in {delay:g}s (failure {n} of {C.MAX_STANDBY_FAILURES})")
    ctx.plan.requeue(delay)
    return replace(st, standby_failures=n, standby_retry_at=ctx.now + timedelta(seconds=delay))


def _standby_failed_recently(ctx: Ctx, st: PhaseStatus) -> bool:
    """No new standby yet: one failed and its backoff is not over, or a standby gang was
    released (not schedulable) less than gangScheduleTimeoutSeconds ago, or this attempt's
    standbys failed MAX_STANDBY_FAILURES times in a row."""
    if st.standby_failures >= C.MAX_STANDBY_FAILURES:
        return True
    if st.standby_retry_at is not None and ctx.now < st.standby_retry_at:
        ctx.plan.requeue((st.standby_retry_at - ctx.now).total_seconds())
        return True
    return False


def _collect_ended_standbys(ctx: Ctx, st: PhaseStatus, pods: Pods) -> None:
    """Delete the pod objects of standbys that ended, but the newest one's (its logs say why
    it failed): kept, every one of them was re-read on every pass. A spare counts wherever
    its reserved number lies: one that a replacement passed while it was Pending is numbered
    below the active attempt, and one that serves a member is no standby (never collected)."""
    current = st.standby.attempt if st.standby is not None else None
    serving = {st.member_attempt(m) for m in st.spare_members}
    ended: dict[int, list[Mapping[str, Any]]] = {}
    for a, members in pods.items():
        if a == current or not members:
            continue
        if a > st.attempts:
            if all(is_standby_pod(p) and not ctx.outcome(p).live for p in members):
                ended[a] = list(members)
        elif a not in serving:
            spares = [p for p in members if is_spare_pod(p) and not ctx.outcome(p).live]
            if spares:
                ended[a] = spares
    older = sorted(ended)[:-1]
    ctx.delete_live([p for a in older for p in ended[a]], "an ended standby's pod", grace=0)
