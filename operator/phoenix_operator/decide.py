"""The operator's brain: ``decide(job, pods, checkpoints, now) -> Plan``.

Pure: no API calls, no clock reads, no globals. The handler gathers the facts (the job as
the API returns it, the job's pods listed by label, checkpoint listings it verified in
storage, the health of the nodes its live pods are bound to, the time), calls ``decide`` and applies the plan: create pods, delete pods, post
events, write status. Running ``decide`` twice on the same facts gives the same plan; running
it on the facts left by a half-applied plan (operator killed between creating a pod and
writing status) finishes the job instead of repeating it, because pod names are
deterministic and pods newer than the status are adopted, never duplicated.

Pod creation is intent-first: the plan's status (naming the new pod, guarded by the job's
resourceVersion) is written before the pod is created, so an operator acting on a stale view
loses the write and creates nothing. A status that names a pod with no ``podUID`` and no pod
means "not created yet" and the same pod is created again; a recorded ``podUID`` whose pod is
gone means the pod was deleted (a preemption).

If a decision needs checkpoint listings the caller did not pass, the plan says so in
``needs_checkpoints`` and holds back that phase's pod; the caller lists them and calls again.

A gang phase (``replicas`` > 1) runs each attempt as that many pods, created together (with
their headless Service). The attempt is one unit: it is live while every member is, it
succeeds when every member has, and the first member to end otherwise ends it — a member
that was preempted is the cause before any that failed (its peers fail only because they lost
it) — and the live members are deleted with their grace before the next attempt. One
preemption or failure is counted, naming that member. A gang not fully scheduled within
``recovery.gangScheduleTimeoutSeconds`` is released (its pods deleted, no budget charged) and
tried again after the same time.

Standbys and notices. A standby is the phase's next attempt started ahead of need: its pod
(a gang's: all its members, a *standby gang*) is created (status first, as always) but the
storage fence is not moved, so it waits (see ``phoenix_trainer.control``). A standby gang is
one unit like an active gang: ready when every member is, lost when any member ends, released
when not all scheduled in time, promoted with one fence write. When the active attempt ends, the
standby is *promoted* instead of a pod being created: the fence moves to it, naming the
checkpoint to resume from, and that is its signal to start. ``recovery.standby`` keeps one
standby per running phase (off the active pod's node). A *notice* is a taint or condition on
the active pod's node announcing its reclaim: the trainer is asked for a checkpoint now
(``control.json``), and with ``onNotice: Handoff`` a standby is started on another node; once
it reports Ready the trainer is asked to hand off: it saves a final checkpoint at the next
step boundary, fences the phase for the standby naming that checkpoint, and exits as
preempted. One writer at all times: only the fence's attempt may publish checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

from . import constants as C
from .classify import (LIVE, NodeHealth, Outcome, classify, gone, node_grace_left,
                       pull_grace_left, stranded)
from .constants import Cause, JobPhase, PhaseState
from phoenix_trainer.core.contract import MAX_REASON_CHARS, REASON_PREEMPTED
from phoenix_trainer.core.handshake import Control, Fence
from phoenix_trainer.core.layout import split_checkpoint_uri

from .model import (
    CheckpointRef, Failure, JobSpec, Notice, PhaseSpec, PhaseStatus, StandbyRef, bounded,
    parse_ts, phase_statuses, ts,
)
from .podspec import build_pod, build_service, pod_name
from .states import Event, is_terminal, job_phase, transition

S = PhaseState
STORAGE_RETRY_SECONDS = 15.0
# A foreign pod holds a name we need: look again this often (its deletion, if it carries our
# job label, triggers a pass at once anyway).
CONFLICT_RETRY_SECONDS = 30.0


# --- inputs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    """One ``step-N`` directory as the operator verified it."""

    step: int
    uri: str
    valid: bool
    reason: str = ""
    epoch: int | None = None
    time: datetime | None = None
    resume_exact: bool | None = None  # from the manifest's extra, when the trainer wrote it
    resume_exact_reason: str = ""


@dataclass(frozen=True)
class Listing:
    """The checkpoints under one phase's prefix, or why they could not be listed."""

    checkpoints: tuple[Checkpoint, ...] = ()
    error: str | None = None
    # The prefix's fence.json as found (None: none), and - when it names another job -
    # whether that job still exists (None: could not tell).
    fence: Fence | None = None
    owner_live: bool | None = None

    def newest_valid(self, exclude: Sequence[int] = ()) -> Checkpoint | None:
        for c in sorted(self.checkpoints, key=lambda c: c.step, reverse=True):
            if c.valid and c.step not in exclude:
                return c
        return None

    def invalid_newer_than(self, step: int | None) -> list[Checkpoint]:
        return sorted((c for c in self.checkpoints
                       if not c.valid and (step is None or c.step > step)),
                      key=lambda c: c.step, reverse=True)


# --- outputs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CreatePod:
    name: str
    phase: str
    attempt: int
    manifest: dict[str, Any]
    resume_from: str | None
    previous_end: datetime | None  # when the attempt it replaces ended (time-to-replacement)
    previous_cause: str | None
    standby: bool = False  # a standby: the fence is not moved for it


@dataclass(frozen=True)
class Promote:
    """Move the phase's fence to a waiting standby (its signal to start), naming the
    checkpoint to resume from. Written before the status that records it."""

    phase: str
    attempt: int
    pod: str
    resume_from: str | None
    previous_end: datetime | None
    previous_cause: str | None


@dataclass(frozen=True)
class ControlWrite:
    """Write ``control.json`` for a phase (requests to its running attempt)."""

    phase: str
    control: Control


@dataclass(frozen=True)
class DeletePod:
    name: str
    grace_seconds: int
    reason: str
    # Grace 0 because the pod's node is lost: applied before any create of the same plan, so
    # the replacement never coexists with the old pod object.
    force: bool = False


@dataclass(frozen=True)
class Note:
    """A Kubernetes Event to post on the PhoenixJob."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Recovery:
    """An attempt that ended unsuccessfully (for metrics: recoveries by cause)."""

    phase: str
    cause: str
    reason: str


@dataclass
class Plan:
    status: dict[str, Any]
    create: list[CreatePod] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)  # ensured before the pods
    promote: list[Promote] = field(default_factory=list)  # storage writes: before the status
    control: list[ControlWrite] = field(default_factory=list)
    delete: list[DeletePod] = field(default_factory=list)
    events: list[Note] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    needs_checkpoints: set[str] = field(default_factory=set)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        if self.requeue_after is None or seconds < self.requeue_after:
            self.requeue_after = seconds


# --- the decision ----------------------------------------------------------------------

Pods = Mapping[int, Sequence[Mapping[str, Any]]]  # attempt -> its pods (a gang's members)


def member_of(pod: Mapping[str, Any]) -> int:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(C.LABEL_MEMBER, 0))
    except ValueError:
        return 0


def is_standby_pod(pod: Mapping[str, Any]) -> bool:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(C.LABEL_STANDBY) == "true"


def pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or ())


def pods_by_phase(pods: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, list[Mapping[str, Any]]]]:
    out: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        try:
            attempt = int(labels.get(C.LABEL_ATTEMPT, ""))
        except ValueError:
            continue
        out.setdefault(labels.get(C.LABEL_PHASE, ""), {}).setdefault(attempt, []).append(pod)
    for attempts in out.values():
        for members in attempts.values():
            members.sort(key=member_of)
    return out


@dataclass
class _Ctx:
    job: str
    namespace: str
    uid: str
    spec: JobSpec
    checkpoints: Mapping[str, Listing]
    now: datetime
    plan: Plan
    nodes: Mapping[str, NodeHealth] = field(default_factory=dict)
    foreign: Mapping[str, str] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    prefix_conflicts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # checkpoints the status names, not listed
    storage_errors: list[str] = field(default_factory=list)  # listings that failed, and why
    stranded: list[str] = field(default_factory=list)

    def note(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append(Note(type_, reason, message))

    def outcome(self, pod: Mapping[str, Any]) -> Outcome:
        """``classify`` with the node facts: a pod on a lost node is over; one on a node
        NotReady past the grace is stranded (noted, not replaced)."""
        grace = C.NODE_NOT_READY_GRACE_SECONDS
        left = node_grace_left(pod, self.nodes, self.now, grace)
        if left is not None:
            self.plan.requeue(left)  # look again when the NotReady grace runs out
        pulling = pull_grace_left(pod, self.now)
        if pulling is not None and pulling > 0:
            self.plan.requeue(pulling)  # an image pull error counts once its grace is over
        why = stranded(pod, self.nodes, self.now, grace)
        if why and why not in self.stranded:
            self.stranded.append(why)
        return classify(pod, self.nodes, self.now)


def decide(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]],
           checkpoints: Mapping[str, Listing], now: datetime,
           nodes: Mapping[str, NodeHealth] | None = None,
           foreign: Mapping[str, str] | None = None) -> Plan:
    """``nodes``: health of the nodes the job's live pods are bound to, by name (missing
    names count as healthy). ``foreign``: pod names the status wants that are taken by pods
    this job does not own, with who owns them."""
    meta = job.get("metadata") or {}
    spec = JobSpec.parse(job.get("spec") or {})
    old = dict(job.get("status") or {})
    statuses = phase_statuses(spec, old)
    ctx = _Ctx(job=meta["name"], namespace=meta.get("namespace") or "default",
               uid=str(meta.get("uid") or ""), spec=spec,
               checkpoints=checkpoints, now=now, plan=Plan(status={}), nodes=nodes or {},
               foreign=foreign or {})
    grouped = pods_by_phase(pods)
    # Spec order: a phase that succeeds in this pass lets its dependents start in the same pass.
    for phase in spec.phases:
        statuses[phase.name] = _decide_phase(ctx, phase, statuses[phase.name],
                                             grouped.get(phase.name, {}), statuses)
    ctx.plan.status = _job_status(ctx, statuses, old, meta.get("generation"))
    new_phase = ctx.plan.status["phase"]
    if new_phase != old.get("phase"):
        if new_phase == JobPhase.SUCCEEDED.value:
            ctx.note("Normal", C.EV_JOB_SUCCEEDED, "all phases succeeded")
        elif new_phase == JobPhase.FAILED.value:
            ctx.note("Warning", C.EV_JOB_FAILED, failure_summary(spec, statuses))
    return ctx.plan


def _decide_phase(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods,
                  statuses: Mapping[str, PhaseStatus]) -> PhaseStatus:
    if is_terminal(st.state):
        return _drop_standby(ctx, st, pods, "the phase is over")
    # Pods on a lost node look live until pod GC removes them (tens of seconds); nothing runs
    # them any more, so delete them now, without grace, whatever the phase's state.
    for pod in (p for members in pods.values() for p in members):
        lost = ctx.outcome(pod)
        if lost.force:
            ctx.plan.delete.append(DeletePod(pod["metadata"]["name"], 0, lost.reason,
                                             force=True))
    # Catch up with the cluster: account the recorded attempt if it ended, adopt pods the
    # status does not know yet (a status write lost after a pod was created). Bounded: each
    # round either changes the state or stops.
    for _ in range(2 * len(pods) + 2):
        # (A standby's pods are newer too, but the status always knew them: never adopted.)
        newer = [a for a in pods if a > st.attempts and not is_standby_pod(pods[a][0])]
        if st.state == S.RUNNING:
            members = pods.get(st.attempts, ())
            if len(members) < phase.replicas and st.pod_uid is None:
                if not members and st.pod in ctx.foreign:
                    _conflict(ctx, phase, st.pod, ctx.foreign[st.pod])
                    break
                # Status was written (intent) but the pods never all got created: the
                # operator stopped in between. Create them now, same attempt, same names
                # (a promoted standby gang's as standbys: their hostnames, and the fence
                # already names them).
                if any(is_standby_pod(p) for p in members):
                    _create_standby(ctx, phase, st, st.attempts, pods)
                elif not ctx.spec.suspend:
                    st = _start_attempt(ctx, phase, st, Event.RECREATE)
                break
            outcome, culprit, live = _attempt_outcome(ctx, phase, st, members)
            if outcome.live:
                uid = members[0].get("metadata", {}).get("uid") if members else None
                if uid and st.pod_uid is None:
                    st = replace(st, pod_uid=uid)
                if phase.replicas > 1:
                    st = _gang_scheduled_in_time(ctx, phase, st, members)
                break
            if outcome.delete and not outcome.force and culprit is not None:
                ctx.plan.delete.append(DeletePod(
                    culprit["metadata"]["name"], ctx.spec.recovery.grace_seconds, outcome.reason))
            name = culprit["metadata"]["name"] if culprit is not None else None
            _delete_live(ctx, live, f"gang member {name} ended the attempt")
            st = _account(ctx, phase, st, outcome, name)
            continue
        if st.state in (S.RECOVERING, S.PENDING) and newer and not ctx.spec.suspend:
            st = _adopt(ctx, phase, st, max(newer), pods[max(newer)][0])
            continue
        break
    if is_terminal(st.state):
        return _drop_standby(ctx, st, pods, "the phase is over")

    if ctx.spec.suspend:
        return _suspend(ctx, phase, _drop_standby(ctx, st, pods, "the job is suspended"), pods)
    if st.state == S.SUSPENDED:
        st = _unsuspend(ctx, phase, st, pods)
    if st.state == S.RECOVERING:
        if st.next_attempt_at is not None and ctx.now < st.next_attempt_at:
            ctx.plan.requeue((st.next_attempt_at - ctx.now).total_seconds())
            return st
        standby = _live_standby(ctx, phase, st, pods)
        if standby is not None:
            why = _cannot_take_over(ctx, phase, st, pods)
            if why is None:
                return _promote(ctx, phase, st, standby)
            ctx.note("Warning", C.EV_STANDBY_LOST, f"phase {phase.name}: standby {standby.pod} "
                     f"cannot take over: {why}; starting a fresh attempt instead")
            st = _drop_standby(ctx, st, pods, why)
        if st.standby is not None:
            st = replace(st, standby=None)  # it ended too; a new attempt is created below
        old_live = [p for a, members in pods.items() if a <= st.attempts for p in members
                    if ctx.outcome(p).live]
        if old_live:
            if phase.replicas > 1:  # a gang's peers, should a delete have been lost
                _delete_live(ctx, old_live, "the gang's attempt is over")
            return st  # never two live trainer pods: wait for the old ones to be gone
        return _start_attempt(ctx, phase, st, Event.REPLACE)
    if st.state == S.RUNNING:
        return _standby_and_notice(ctx, phase, st, pods)
    if st.state == S.PENDING:
        deps = [statuses[d] for d in phase.depends_on if d in statuses]
        if phase.independent:
            if all(is_terminal(d.state) for d in deps):
                return _start_attempt(ctx, phase, st, Event.START)
            return st
        broken = [d.name for d in deps if d.state in (S.FAILED, S.BLOCKED)]
        if broken:
            ctx.note("Warning", C.EV_PHASE_BLOCKED,
                     f"phase {phase.name} will not run: dependency {', '.join(broken)} failed")
            return replace(st, state=transition(st.state, Event.BLOCK), completed_at=ctx.now)
        if all(d.state == S.SUCCEEDED for d in deps):
            return _start_attempt(ctx, phase, st, Event.START)
    return st


def _conflict(ctx: _Ctx, phase: PhaseSpec, name: str, owner: str) -> None:
    """The name of this attempt's pod is taken by a pod we do not own: never adopt, delete
    or retry it in a loop; say so (condition + one event) and look again later."""
    ctx.conflicts.append(
        f"phase {phase.name}: pod {ctx.namespace}/{name} exists and is not owned by this "
        f"PhoenixJob ({owner}); Phoenix will neither adopt nor delete it. Delete or rename it "
        f"and attempt {name.rsplit('-', 1)[-1]} starts; looking again every "
        f"{CONFLICT_RETRY_SECONDS:g}s")
    ctx.plan.requeue(CONFLICT_RETRY_SECONDS)


def _attempt_outcome(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus,
                     members: Sequence[Mapping[str, Any]]
                     ) -> tuple[Outcome, Mapping[str, Any] | None, list[Mapping[str, Any]]]:
    """How the recorded attempt stands: (its outcome, the pod that decided it, live pods).

    One pod: that pod's outcome (gone if it vanished). A gang: live while no member ended;
    completed when all completed; else the earliest preempted member ends it, or, with no
    preemption, the earliest failed one (see the module docstring)."""
    if phase.replicas <= 1:
        pod = members[0] if members else None
        outcome = ctx.outcome(pod) if pod is not None else gone(st.pod or "")
        return outcome, pod, [pod] if pod is not None and outcome.live else []
    by_member = {member_of(p): p for p in members}
    seen = []
    for i in range(phase.replicas):
        pod = by_member.get(i)
        name = pod_name(ctx.job, phase.name, st.attempts, i)
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
    pod, outcome, name = min(preempted or bad, key=lambda x: (
        x[1].finished_at or far, x[1].exit_code not in killed and x[1].reason != C.R_OOM, x[2]))
    return outcome, pod if pod is not None else {"metadata": {"name": name}}, live


def _delete_live(ctx: _Ctx, pods: Sequence[Mapping[str, Any]], reason: str,
                 grace: int | None = None) -> None:
    """Delete pods (live ones with their grace, or ended ones whose objects go) that are not
    being deleted yet and not already planned."""
    planned = {d.name for d in ctx.plan.delete}
    for pod in pods:
        if not (pod.get("metadata") or {}).get("deletionTimestamp") and pod["metadata"]["name"] not in planned:
            ctx.plan.delete.append(DeletePod(pod["metadata"]["name"],
                                             ctx.spec.recovery.grace_seconds if grace is None else grace,
                                             reason))


def _unscheduled_past_timeout(ctx: _Ctx, members: Sequence[Mapping[str, Any]],
                              since: datetime) -> list[str]:
    """A gang's members not bound to a node, once gangScheduleTimeoutSeconds have passed
    since the first was created (``since`` when none says); else [] (and a requeue for when
    the time is up)."""
    waiting = [p["metadata"]["name"] for p in members if not (p.get("spec") or {}).get("nodeName")]
    if not waiting:
        return []
    created = [t for p in members if (t := parse_ts((p.get("metadata") or {}).get("creationTimestamp")))]
    left = ctx.spec.recovery.gang_schedule_timeout - (
        ctx.now - (min(created) if created else since)).total_seconds()
    if left > 0:
        ctx.plan.requeue(left)
        return []
    return waiting


def _gang_scheduled_in_time(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus,
                            members: Sequence[Mapping[str, Any]]) -> PhaseStatus:
    """All-or-nothing: a gang whose members are not all bound to nodes within the timeout
    releases what it holds (deletes its pods; no budget charged) and tries again later."""
    waiting = _unscheduled_past_timeout(ctx, members, ctx.now)
    if not waiting:
        return st
    timeout = ctx.spec.recovery.gang_schedule_timeout
    why = (f"{len(waiting)} of {phase.replicas} pods ({', '.join(waiting)}) not scheduled within"
           f" gangScheduleTimeoutSeconds={timeout:g}; released the gang's pods, trying again in"
           f" {timeout:g}s")
    ctx.note("Warning", C.EV_GANG_UNSCHEDULABLE, f"phase {phase.name}: {why}")
    _delete_live(ctx, members, "gang not schedulable in time")
    failure = Failure(cause="unschedulable", reason=C.EV_GANG_UNSCHEDULABLE, exit_code=None,
                      message=why, time=ctx.now, attempt=st.attempts)
    ctx.plan.requeue(timeout)
    return replace(st, state=transition(st.state, Event.PREEMPT), last_failure=failure,
                   next_attempt_at=ctx.now + timedelta(seconds=timeout))


def _checkpoint_from(outcome: Outcome, st: PhaseStatus, when: datetime) -> CheckpointRef | None:
    tm = outcome.termination
    if tm and tm.checkpoint and tm.step is not None:
        if st.last_checkpoint is not None and tm.checkpoint == st.last_checkpoint.uri:
            return st.last_checkpoint  # nothing newer (e.g. no emergency save)
        # The message's step is where the trainer stopped; its checkpoint may be older (no
        # emergency save): record the checkpoint's own step, from its directory name.
        _, step = split_checkpoint_uri(tm.checkpoint)
        step = tm.step if step is None else step
        if st.last_checkpoint is None or step >= st.last_checkpoint.step:
            return CheckpointRef(uri=tm.checkpoint, step=step, time=when)
    return st.last_checkpoint


def _describe(outcome: Outcome) -> str:
    parts = [outcome.reason]
    if outcome.exit_code is not None:
        parts.append(f"exit code {outcome.exit_code}")
    text = ", ".join(parts)
    tm = outcome.termination
    if tm and tm.step is not None:
        text += f"; trainer stopped at step {tm.step}"
        if tm.checkpoint:
            saved = "emergency checkpoint saved" if tm.emergencySaveCompleted else "last checkpoint"
            text += f" ({saved}: {tm.checkpoint})"
    if outcome.message:
        text += f": {outcome.message}"
    return text


def _account(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, outcome: Outcome,
             member: str | None = None) -> PhaseStatus:
    """The recorded attempt ended: charge the right budget and move the state machine.
    ``member``: the pod that ended it (a gang's member that caused it)."""
    ended = outcome.finished_at or ctx.now
    outcome = _handed_off(st, outcome)
    pod = member or st.pod or pod_name(ctx.job, phase.name, st.attempts)
    if phase.replicas > 1 and outcome.cause != Cause.COMPLETED:
        pod = f"{pod} (gang member {pod.rsplit('.', 1)[-1]} of {phase.replicas})"
    st = replace(st, last_checkpoint=_checkpoint_from(outcome, st, ended))
    tm = outcome.termination
    if tm and tm.resumeExact is not None:
        st = _exactness(st, tm.resumeExact, tm.resumeExactReason)
    if outcome.cause == Cause.COMPLETED:
        ctx.note("Normal", C.EV_PHASE_SUCCEEDED,
                 f"phase {phase.name} succeeded in pod {pod} (attempt {st.attempts})")
        return replace(st, state=transition(st.state, Event.SUCCEED), completed_at=ended,
                       next_attempt_at=None)
    rec = ctx.spec.recovery
    unstarted = 0 if outcome.started else st.unstarted_preemptions + 1
    st = replace(st, unstarted_preemptions=unstarted)
    if outcome.cause == Cause.PREEMPTION and unstarted >= C.MAX_UNSTARTED_PREEMPTIONS:
        outcome = replace(outcome, cause=Cause.FAILURE, reason=C.R_NEVER_STARTED, message=(
            f"{unstarted} attempts in a row ended before the trainer started (last: "
            f"{outcome.reason}: {outcome.message}); check that the node pool has the capacity "
            "the pod template asks for and that its nodeSelector, tolerations and admission "
            "rules fit a node"))
    failure = Failure(cause=outcome.cause.value, reason=outcome.reason,
                      exit_code=outcome.exit_code, message=outcome.message, time=ended,
                      attempt=st.attempts, pod=member)
    ctx.plan.recoveries.append(Recovery(phase.name, outcome.cause.value, outcome.reason))
    what = _describe(outcome)
    if outcome.cause == Cause.PREEMPTION:
        n = st.preemptions + 1
        st = replace(st, preemptions=n, last_failure=failure)
        if rec.max_preemptions is not None and n > rec.max_preemptions:
            return _exhaust(ctx, phase, st, ended,
                            f"{n} preemptions exceed maxPreemptions={rec.max_preemptions}; "
                            f"last: attempt {st.attempts} {what}")
        # A preemption is not the job's fault and is replaced at once - unless attempts keep
        # ending before the trainer runs: from the second in a row they back off.
        delay = rec.backoff(unstarted - 1) if unstarted > 1 else 0.0
        when = (f"retrying in {delay:g}s ({unstarted} in a row before the trainer started)"
                if delay else "replacing now")
        ctx.note("Normal", C.EV_PREEMPTED,
                 f"phase {phase.name} pod {pod} (attempt {st.attempts}) preempted: {what}; "
                 f"{when} (preemption {n}"
                 + (f" of {rec.max_preemptions})" if rec.max_preemptions is not None else ")"))
        return replace(st, state=transition(st.state, Event.PREEMPT),
                       next_attempt_at=ended + timedelta(seconds=delay) if delay else None)
    n = st.failures + 1
    st = replace(st, failures=n, last_failure=failure,
                 consecutive_failures_at_checkpoint=st.consecutive_failures_at_checkpoint + 1)
    if n > rec.max_failures:
        return _exhaust(ctx, phase, st, ended,
                        f"{n} failures exceed maxFailures={rec.max_failures}; "
                        f"last: attempt {st.attempts} {what}")
    delay = rec.backoff(n)
    ctx.note("Warning", C.EV_FAILED,
             f"phase {phase.name} pod {pod} (attempt {st.attempts}) failed: {what}; "
             f"retrying in {delay:g}s (failure {n} of {rec.max_failures} allowed)")
    return replace(st, state=transition(st.state, Event.FAIL),
                   next_attempt_at=ended + timedelta(seconds=delay))


def _exactness(st: PhaseStatus, exact: bool, reason: str) -> PhaseStatus:
    """The trainer's verdict, from a termination message or a manifest: text from outside,
    bounded here (a status the CRD refuses for its length fails every patch, for ever)."""
    return replace(st, resume_exact=exact, resume_exact_reason=bounded(reason, MAX_REASON_CHARS))


def _handed_off(st: PhaseStatus, outcome: Outcome) -> Outcome:
    """The trainer's "preempted" needs corroboration (classify): the operator's own handoff
    request to this attempt is one, even if the node's notice was lifted meanwhile."""
    n = st.last_notice
    tm = outcome.termination
    if (outcome.cause == Cause.FAILURE and outcome.reason == C.R_SIGTERM and tm is not None
            and tm.reason == REASON_PREEMPTED and n is not None and n.attempt == st.attempts
            and n.handoff_to is not None):
        return replace(outcome, cause=Cause.PREEMPTION, reason=C.R_HANDOFF,
                       message=f"handed off to attempt {n.handoff_to} as the operator asked "
                               f"({n.signal} on node {n.node}); {tm.message}".strip("; "))
    return outcome


def _exhaust(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, ended: datetime,
             why: str) -> PhaseStatus:
    ctx.note("Warning", C.EV_BUDGET_EXHAUSTED, f"phase {phase.name}: {why}")
    ctx.note("Warning", C.EV_PHASE_FAILED, f"phase {phase.name} failed")
    msg = replace(st.last_failure, message=why) if st.last_failure else None
    return replace(st, state=transition(st.state, Event.EXHAUST), completed_at=ended,
                   next_attempt_at=None, last_failure=msg)


def _adopt(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, attempt: int,
           pod: Mapping[str, Any]) -> PhaseStatus:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    name = pod["metadata"]["name"]
    ctx.note("Normal", C.EV_POD_ADOPTED,
             f"phase {phase.name}: found pod {name} (attempt {attempt}) not yet in status; "
             f"adopting it instead of creating another")
    event = Event.START if st.state == S.PENDING else Event.REPLACE
    resume = ann.get(C.ANNOTATION_RESUME_FROM)
    return replace(st, state=transition(st.state, event), attempts=attempt, pod=name,
                   pod_uid=pod["metadata"].get("uid"), resume_from=resume, next_attempt_at=None,
                   started_at=st.started_at or ctx.now)


def _suspend(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    grace = ctx.spec.recovery.grace_seconds
    members = pods.get(st.attempts, ())
    if st.state in (S.RUNNING, S.RECOVERING):
        ctx.note("Normal", C.EV_SUSPENDING,
                 f"phase {phase.name}: job suspended"
                 + (f"; deleting pod {st.pod} with {grace}s grace" if st.state == S.RUNNING else ""))
        st = replace(st, state=transition(st.state, Event.SUSPEND), next_attempt_at=None)
    if st.state != S.SUSPENDED or not members:
        return st
    outcome, _, live = _attempt_outcome(ctx, phase, st, members)
    if live:
        _delete_live(ctx, live, "suspend", grace)
        return st
    st = replace(st, last_checkpoint=_checkpoint_from(outcome, st, outcome.finished_at or ctx.now))
    if outcome.cause == Cause.COMPLETED:
        return _account_suspended_success(ctx, phase, st, outcome)
    return st


def _account_suspended_success(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus,
                               outcome: Outcome) -> PhaseStatus:
    ctx.note("Normal", C.EV_PHASE_SUCCEEDED,
             f"phase {phase.name} succeeded in pod {st.pod} while the job was suspending")
    return replace(st, state=transition(st.state, Event.SUCCEED),
                   completed_at=outcome.finished_at or ctx.now)


def _unsuspend(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    members = pods.get(st.attempts, ())
    if members:
        outcome, _, live = _attempt_outcome(ctx, phase, st, members)
        if live:
            return st  # still terminating; its end will trigger us again
        st = replace(st, last_checkpoint=_checkpoint_from(
            outcome, st, outcome.finished_at or ctx.now))
        if outcome.cause == Cause.COMPLETED:
            return _account_suspended_success(ctx, phase, st, outcome)
    ctx.note("Normal", C.EV_RESUMED, f"phase {phase.name}: job resumed; starting a new attempt")
    return replace(st, state=transition(st.state, Event.RESUME), next_attempt_at=None)


@dataclass(frozen=True)
class _ResumePoint:
    """Where the next attempt starts: ``st`` updated with the fallback bookkeeping."""

    st: PhaseStatus
    chosen: Checkpoint | None
    init: Checkpoint | None


def _resume_point(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus) -> _ResumePoint | None:
    """The newest checkpoint verified valid (falling back past one that keeps failing) and
    the previous phase's weights; None if the listings are missing (asked for) or failed."""
    wanted = [phase.name] + ([phase.depends_on[0]] if phase.depends_on else [])
    missing = [p for p in wanted if p not in ctx.checkpoints]
    if missing:
        ctx.plan.needs_checkpoints.update(missing)
        return None
    listing = ctx.checkpoints[phase.name]
    dep_listing = ctx.checkpoints[phase.depends_on[0]] if phase.depends_on else None
    for lst, whose in ((listing, phase.name), (dep_listing, phase.depends_on[:1])):
        if lst is not None and lst.error:
            why = f"phase {phase.name}: cannot list checkpoints of {whose}: {lst.error}"
            ctx.note("Warning", C.EV_STORAGE_ERROR,
                     f"{why}; retrying in {STORAGE_RETRY_SECONDS:g}s")
            ctx.storage_errors.append(why)
            ctx.plan.requeue(STORAGE_RETRY_SECONDS)
            return None

    skipped = tuple(st.skipped_steps)
    consecutive = st.consecutive_failures_at_checkpoint
    rec = ctx.spec.recovery
    if st.resume_from and consecutive >= rec.fallback_after:
        bad = next((c.step for c in listing.checkpoints if c.uri == st.resume_from), None)
        if bad is not None and bad not in skipped:
            skipped = skipped + (bad,)
            ctx.note("Warning", C.EV_CHECKPOINT_FALLBACK,
                     f"phase {phase.name}: {consecutive} failures in a row resuming from step "
                     f"{bad}; falling back to the checkpoint before it")
    chosen = listing.newest_valid(exclude=skipped)
    known = st.last_checkpoint
    if chosen is None and known is not None and known.step > 0 and \
            not any(c.step == known.step for c in listing.checkpoints):
        # Invariant 6: the status names a checkpoint that storage no longer lists at all
        # (the endpoint, bucket or credentials changed, or the objects were deleted). A
        # start from step 0 would throw the progress away without a word: say so instead.
        ctx.missing.append(
            f"phase {phase.name}: the status names checkpoint {known.uri} (step {known.step}), "
            f"but {ctx.spec.checkpoint.phase_uri(phase.name)} lists no valid checkpoint; not "
            "starting from step 0. Restore the checkpoints or the storage settings "
            "(checkpoint.endpoint, region, credentialsSecret); to start over from step 0, "
            f"create the PhoenixJob anew; looking again every {STORAGE_RETRY_SECONDS:g}s")
        ctx.plan.requeue(STORAGE_RETRY_SECONDS)
        return None
    for bad in listing.invalid_newer_than(chosen.step if chosen else None):
        ctx.note("Warning", C.EV_CHECKPOINT_SKIPPED,
                 f"phase {phase.name}: skipping checkpoint step {bad.step} ({bad.uri}): "
                 f"{bad.reason or 'invalid'}")
    if (chosen.uri if chosen else None) != st.resume_from:
        consecutive = 0
    init = dep_listing.newest_valid() if dep_listing is not None else None
    last = st.last_checkpoint
    if chosen and (last is None or chosen.step >= last.step):
        last = CheckpointRef(uri=chosen.uri, step=chosen.step, epoch=chosen.epoch,
                             time=chosen.time or (last.time if last and last.uri == chosen.uri
                                                  else None))
    if chosen and chosen.resume_exact is not None:
        st = _exactness(st, chosen.resume_exact, chosen.resume_exact_reason)
    st = replace(st, consecutive_failures_at_checkpoint=consecutive, skipped_steps=skipped,
                 last_checkpoint=last)
    return _ResumePoint(st, chosen, init)


def _start_attempt(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, event: Event) -> PhaseStatus:
    """Create the next attempt's pod, resuming from the newest checkpoint verified valid."""
    point = _resume_point(ctx, phase, st)
    if point is None:
        return st
    st, chosen, init = point.st, point.chosen, point.init
    floor = _fence_floor(ctx, phase, st, ctx.checkpoints[phase.name])
    if floor is None:
        return st  # another live job holds the prefix
    resume = chosen.uri if chosen else None
    attempt = st.attempts if event == Event.RECREATE else max(st.next_attempt_number, floor + 1)
    previous = st.last_failure if event == Event.REPLACE else None
    members: list[int | None] = list(range(phase.replicas)) if phase.replicas > 1 else [None]
    if phase.replicas > 1:
        ctx.plan.services.append(build_service(job=ctx.job, namespace=ctx.namespace, phase=phase.name))
    names = []
    for member in members:  # a gang all at once: the scheduler sees every member together
        manifest = build_pod(job=ctx.job, namespace=ctx.namespace, spec=ctx.spec, phase=phase,
                             attempt=attempt, resume_from=resume,
                             resume_step=chosen.step if chosen else None,
                             init_from=init.uri if init else None, member=member,
                             job_uid=ctx.uid)
        names.append(manifest["metadata"]["name"])
        first = member in (None, 0)  # time-to-replacement is observed once per attempt
        ctx.plan.create.append(CreatePod(
            name=names[-1], phase=phase.name, attempt=attempt, manifest=manifest, resume_from=resume,
            previous_end=previous.time if previous and first else None,
            previous_cause=previous.cause if previous and first else None))
    name = names[0]
    where = f"resuming from step {chosen.step} ({resume})" if chosen else "starting fresh"
    if init and not chosen:
        where += f", initialised from {init.uri}"
    reason = {Event.START: C.EV_POD_CREATED, Event.RECREATE: C.EV_POD_CREATED}.get(
        event, C.EV_RESUMING)
    what = f"pod {name}" if len(names) == 1 else f"gang of {len(names)} pods {names[0]}..{names[-1].rsplit('.', 1)[-1]}"
    ctx.note("Normal", reason, f"phase {phase.name}: created {what} (attempt {attempt}), {where}")
    return replace(st, state=transition(st.state, event), attempts=attempt, pod=name,
                   pod_uid=None, resume_from=resume, next_attempt_at=None, standby_failures=0,
                   started_at=st.started_at or ctx.now, last_attempt=max(st.last_attempt, attempt))


def _fence_floor(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, listing: Listing) -> int | None:
    """The number the next attempt must exceed so that the prefix's fence only grows (a
    re-created job, or a status cleared through /status, counts from 1 again), or None when
    another job that still exists holds the prefix: refused, with a condition naming it."""
    fence = listing.fence
    if fence is None:
        return 0
    uri = ctx.spec.checkpoint.phase_uri(phase.name)
    if fence.uid and fence.uid != ctx.uid:
        owner = f"job {fence.job or '?'} (uid {fence.uid}, attempt {fence.attempt})"
        if listing.owner_live is not False:
            why = ("which still exists" if listing.owner_live else
                   "and Phoenix cannot tell whether that job still exists")
            ctx.prefix_conflicts.append(
                f"phase {phase.name}: {uri} is held by {owner}, {why}; two jobs on one prefix "
                "would write into and resume from each other's checkpoints. Give this job its "
                f"own checkpoint.uri, or delete {fence.job or 'the other job'}; looking again "
                f"every {CONFLICT_RETRY_SECONDS:g}s")
            ctx.plan.requeue(CONFLICT_RETRY_SECONDS)
            return None
        ctx.note("Normal", C.EV_PREFIX_ADOPTED,
                 f"phase {phase.name}: adopted {uri} from {owner}, which no longer exists; "
                 f"attempts continue at {max(st.next_attempt_number, fence.attempt + 1)}")
    return fence.attempt


# --- standbys and notices --------------------------------------------------------------

def _standby_members(st: PhaseStatus, pods: Pods) -> list[Mapping[str, Any]]:
    """Pods of attempts newer than the active one: standbys (the current one, or ones being
    removed). They never wrote: the fence never named them."""
    return [p for a, members in pods.items() if a > st.attempts for p in members]


def _drop_standby(ctx: _Ctx, st: PhaseStatus, pods: Pods, why: str) -> PhaseStatus:
    """Delete every live standby pod of the phase and forget the standby."""
    live = [p for p in _standby_members(st, pods) if ctx.outcome(p).live]
    _delete_live(ctx, live, f"standby no longer needed: {why}")
    return replace(st, standby=None) if st.standby is not None else st


def _live_standby(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> StandbyRef | None:
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


def _cannot_take_over(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> str | None:
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


def _promote(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, sb: StandbyRef) -> PhaseStatus:
    """The active attempt is over: the standby takes over (the fence moves to it). A gang is
    promoted as a unit: one fence write names its attempt, and every member reads it."""
    point = _resume_point(ctx, phase, st)
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


def _sync_standby(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    """Bring ``status.standby`` up to date with its pods: created, scheduled, ready, lost.
    A standby gang is one unit: lost when any member ends (the rest are deleted), released
    when not all scheduled within gangScheduleTimeoutSeconds, ready when every member is."""
    sb = st.standby
    if sb is None:
        return st
    what = f"standby pod {sb.pod}" if phase.replicas == 1 else f"standby gang {sb.pod}.."
    members = pods.get(sb.attempt, ())
    if len(members) < phase.replicas:
        if sb.pod_uid is None:  # intent written, pods not (all) created (operator restarted)
            _create_standby(ctx, phase, st, sb.attempt, pods)
            return st
        ctx.note("Normal", C.EV_STANDBY_LOST, f"phase {phase.name}: {what} lost a pod: "
                 f"{phase.replicas - len(members)} of {phase.replicas} gone" if members else
                 f"phase {phase.name}: {what} is gone")
        _delete_live(ctx, [p for p in members if ctx.outcome(p).live], "the standby gang is lost")
        return replace(st, standby=None)
    for pod in members:
        outcome = ctx.outcome(pod)
        if not outcome.live:
            _delete_live(ctx, [p for p in members if ctx.outcome(p).live],
                         "the standby gang is lost")
            lost = (f"phase {phase.name}: {what} ended before it was needed: pod "
                    f"{pod['metadata']['name']} {_describe(outcome)}")
            if outcome.cause != Cause.FAILURE:  # preempted: not its fault, replaced at once
                ctx.note("Normal", C.EV_STANDBY_LOST, lost)
                return replace(st, standby=None)
            return _standby_failed(ctx, phase, replace(st, standby=None), lost)
    for pod in members:
        node = (pod.get("spec") or {}).get("nodeName")
        health = ctx.nodes.get(node) if node else None
        if health is not None and health.notice:
            ctx.note("Normal", C.EV_STANDBY_LOST,
                     f"phase {phase.name}: {what}'s node {node} announced its reclaim"
                     f" ({health.notice}); replacing the standby")
            _delete_live(ctx, members, f"standby's node {node} announced its reclaim")
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


def _standby_gang_scheduled_in_time(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus,
                                    members: Sequence[Mapping[str, Any]]) -> PhaseStatus | None:
    """As for an active gang (``_gang_scheduled_in_time``): a standby gang not all bound
    within the timeout releases its pods; the next one is started after the same time.
    Returns the status after a release, None while it may still be scheduled."""
    assert st.standby is not None
    waiting = _unscheduled_past_timeout(ctx, members, st.standby.since)
    if not waiting:
        return None
    timeout = ctx.spec.recovery.gang_schedule_timeout
    ctx.note("Warning", C.EV_STANDBY_LOST,
             f"phase {phase.name}: standby gang: {len(waiting)} of {phase.replicas} pods "
             f"({', '.join(waiting)}) not scheduled within gangScheduleTimeoutSeconds="
             f"{timeout:g}; released its pods, starting another in {timeout:g}s")
    _delete_live(ctx, members, "standby gang not schedulable in time")
    ctx.plan.requeue(timeout)
    return replace(st, standby=None, standby_retry_at=ctx.now + timedelta(seconds=timeout))


def _seconds(now: datetime, since: datetime) -> str:
    return f"{max(0.0, (now - since).total_seconds()):.0f}s"


def _node(pod: Mapping[str, Any]) -> str | None:
    return (pod.get("spec") or {}).get("nodeName")


def _create_standby(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, attempt: int,
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
    active = [n for p in pods.get(st.attempts, ()) if (n := _node(p))]
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


def _notice(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, pod: Mapping[str, Any] | None,
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
        ctx.plan.control.append(ControlWrite(phase.name, _control(st, ctx.uid)))
    return st, health.notice


def _standby_and_notice(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    """A running phase: keep its standby (a gang's: a standby gang) current, act on a notice
    on its node (a gang: on any member's node; every rank checkpoints at the same step)."""
    active = list(pods.get(st.attempts, ()))
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
        st = _drop_standby(ctx, st, pods, "the notice was withdrawn")
    noticed = notice is not None and st.last_notice is not None
    bound = len(active) >= phase.replicas and all(_node(p) for p in active)
    # A kept standby waits until the active attempt trains (its pods Ready: restored), so it
    # never competes with that attempt's start; a notice does not wait.
    started = all(pod_ready(p) for p in active)
    if st.standby is None and bound and all(ctx.outcome(p).live for p in active) and (
            (rec.standby and (started or noticed)) or (noticed and handoff)):
        if not _standby_failed_recently(ctx, st):
            attempt = st.next_attempt_number
            reason = "notice" if noticed else "standby"
            name = _create_standby(ctx, phase, st, attempt, pods)
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
    if (noticed and handoff and sb is not None and sb.ready
            and last is not None and last.handoff_to is None):
        st = replace(st, last_notice=replace(last, handoff_to=sb.attempt))
        ctx.note("Normal", C.EV_HANDOFF,
                 f"phase {phase.name}: standby {sb.pod} is ready; asking pod {st.pod} to "
                 f"checkpoint at its next step and hand off to it")
        ctx.plan.control = [c for c in ctx.plan.control if c.phase != phase.name]
        ctx.plan.control.append(ControlWrite(phase.name, _control(st, ctx.uid)))
    return st


def _advice(notice: str) -> bool:
    """A notice that only advises (``ADVISORY_NOTICE_TAINTS``): "taint <key>" as NodeHealth
    names it."""
    kind, _, key = notice.partition(" ")
    return kind == "taint" and key in C.ADVISORY_NOTICE_TAINTS


def _control(st: PhaseStatus, uid: str) -> Control:
    """The control document for the phase's active attempt, from its status (idempotent:
    the same status gives the same document, so a lost write is simply made again)."""
    n = st.last_notice
    assert n is not None
    request = f"{n.signal} on {n.node} at {ts(n.time)}"
    pod = st.standby.pod if st.standby is not None and n.handoff_to == st.standby.attempt else ""
    return Control(attempt=st.attempts, checkpoint_now=request, handoff_to=n.handoff_to,
                   handoff_pod=pod, time=ts(n.time) or "", uid=uid)


def _standby_failed(ctx: _Ctx, phase: PhaseSpec, st: PhaseStatus, lost: str) -> PhaseStatus:
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


def _standby_failed_recently(ctx: _Ctx, st: PhaseStatus) -> bool:
    """No new standby yet: one failed and its backoff is not over, or a standby gang was
    released (not schedulable) less than gangScheduleTimeoutSeconds ago, or this attempt's
    standbys failed MAX_STANDBY_FAILURES times in a row."""
    if st.standby_failures >= C.MAX_STANDBY_FAILURES:
        return True
    if st.standby_retry_at is not None and ctx.now < st.standby_retry_at:
        ctx.plan.requeue((st.standby_retry_at - ctx.now).total_seconds())
        return True
    return False


def _collect_ended_standbys(ctx: _Ctx, st: PhaseStatus, pods: Pods) -> None:
    """Delete the pod objects of standbys that ended, but the newest one's (its logs say why
    it failed): kept, every one of them was re-read on every pass."""
    current = st.standby.attempt if st.standby is not None else None
    ended = sorted(a for a, members in pods.items() if a > st.attempts and a != current
                   and members and all(is_standby_pod(p) and not ctx.outcome(p).live
                                       for p in members))
    _delete_live(ctx, [p for a in ended[:-1] for p in pods[a]], "an ended standby's pod", grace=0)


# --- status ----------------------------------------------------------------------------

def _current_phase(spec: JobSpec, statuses: Mapping[str, PhaseStatus]) -> str | None:
    active = (S.RUNNING, S.RECOVERING, S.SUSPENDED)
    for p in spec.phases:
        if statuses[p.name].state in active:
            return p.name
    started = [p.name for p in spec.phases if statuses[p.name].attempts > 0]
    if started:
        return started[-1]
    return spec.phases[0].name if spec.phases else None


def _condition(old: Mapping[str, Mapping[str, Any]], type_: str, true: bool, reason: str,
               message: str, now: datetime, generation: int | None) -> dict[str, Any]:
    status = "True" if true else "False"
    prev = old.get(type_)
    since = prev.get("lastTransitionTime") if prev and prev.get("status") == status else None
    cond = {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since or ts(now)}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def _resume_exact_condition(ctx: _Ctx, cur: PhaseStatus | None,
                            old_conds: Mapping[str, Mapping[str, Any]],
                            generation: int | None) -> dict[str, Any] | None:
    """``ResumeExact`` from the trainer's own verdict; absent until the trainer has given one."""
    if cur is None or cur.resume_exact is None:
        return None
    if cur.resume_exact:
        return _condition(old_conds, C.COND_RESUME_EXACT, True, "ExactResume",
                          f"phase {cur.name}: the trainer restores everything a resume needs to"
                          " reproduce the uninterrupted run bit for bit", ctx.now, generation)
    message = f"phase {cur.name}: {cur.resume_exact_reason or 'the trainer cannot resume exactly'}"
    if (old_conds.get(C.COND_RESUME_EXACT) or {}).get("status") != "False":
        ctx.note("Warning", C.EV_RESUME_NOT_EXACT, message)
    return _condition(old_conds, C.COND_RESUME_EXACT, False, "ResumeNotExact", message, ctx.now,
                      generation)


def failure_summary(spec: JobSpec, statuses: Mapping[str, PhaseStatus]) -> str:
    parts = []
    for p in spec.phases:
        st = statuses[p.name]
        if st.state == S.FAILED:
            lf = st.last_failure
            parts.append(f"phase {p.name} failed: {lf.message if lf else 'budget exhausted'}")
    blocked = [p.name for p in spec.phases if statuses[p.name].state == S.BLOCKED]
    if blocked:
        parts.append(f"blocked: {', '.join(blocked)}")
    return "; ".join(parts)


def _job_status(ctx: _Ctx, statuses: Mapping[str, PhaseStatus], old: Mapping[str, Any],
                generation: int | None) -> dict[str, Any]:
    spec = ctx.spec
    phase = job_phase([statuses[p.name].state for p in spec.phases], spec.suspend)
    current = _current_phase(spec, statuses)
    cur = statuses.get(current) if current else None
    old_conds = {c.get("type"): c for c in old.get("conditions") or () if c.get("type")}

    running_msg = (f"phase {current} attempt {cur.attempts} running in pod {cur.pod}"
                   if cur and cur.state == S.RUNNING else "no trainer pod running")
    running_reason = "TrainerRunning" if phase == JobPhase.RUNNING else phase.value
    if ctx.stranded:
        running_reason, running_msg = C.REASON_NODE_NOT_READY, "; ".join(ctx.stranded)
        if (old_conds.get(C.COND_RUNNING) or {}).get("reason") != running_reason:
            ctx.note("Warning", C.EV_NODE_NOT_READY, running_msg)
    if cur and cur.state == S.RECOVERING and cur.last_failure:
        lf = cur.last_failure
        recovering_msg = (f"phase {current} attempt {lf.attempt} ended by {lf.cause} "
                          f"({lf.reason})")
        if lf.reason == C.EV_GANG_UNSCHEDULABLE:
            recovering_msg = f"phase {current}: {lf.message}"
        if cur.next_attempt_at and cur.next_attempt_at > ctx.now:
            recovering_msg += f"; next attempt at {ts(cur.next_attempt_at)}"
        recovering_reason = ("Preempted" if lf.cause == Cause.PREEMPTION.value else
                             C.EV_GANG_UNSCHEDULABLE if lf.reason == C.EV_GANG_UNSCHEDULABLE else
                             "BackingOff")
    else:
        recovering_msg, recovering_reason = "", "NotRecovering"
    failed_msg = failure_summary(spec, statuses) if phase == JobPhase.FAILED else ""
    conflict_msg = "; ".join(ctx.conflicts)
    if ctx.conflicts and (old_conds.get(C.COND_POD_CONFLICT) or {}).get("status") != "True":
        ctx.note("Warning", C.EV_POD_CONFLICT, conflict_msg)
    conds = [
        _condition(old_conds, C.COND_RUNNING, phase == JobPhase.RUNNING, running_reason,
                   running_msg, ctx.now, generation),
        _condition(old_conds, C.COND_RECOVERING, phase == JobPhase.RECOVERING,
                   recovering_reason, recovering_msg, ctx.now, generation),
        _condition(old_conds, C.COND_SUSPENDED, phase == JobPhase.SUSPENDED,
                   "Suspended" if phase == JobPhase.SUSPENDED else "NotSuspended",
                   "spec.suspend is true" if phase == JobPhase.SUSPENDED else "", ctx.now,
                   generation),
        _condition(old_conds, C.COND_SUCCEEDED, phase == JobPhase.SUCCEEDED,
                   "AllPhasesSucceeded" if phase == JobPhase.SUCCEEDED else "NotFinished",
                   "" if phase != JobPhase.SUCCEEDED else
                   f"all {len(spec.phases)} phases succeeded", ctx.now, generation),
        _condition(old_conds, C.COND_FAILED, phase == JobPhase.FAILED,
                   "BudgetExhausted" if phase == JobPhase.FAILED else "NotFailed",
                   failed_msg, ctx.now, generation),
        _condition(old_conds, C.COND_POD_CONFLICT, bool(ctx.conflicts),
                   "ForeignPod" if ctx.conflicts else "NoConflict", conflict_msg, ctx.now,
                   generation),
    ]
    standby_failing = [
        f"phase {s.name}: {s.standby_failures} standbys in a row failed before one became ready;"
        f" attempt {s.attempts} keeps none any more (the last standby pod's logs say why; the "
        "next attempt tries again)"
        for s in statuses.values()
        if s.state == S.RUNNING and s.standby_failures >= C.MAX_STANDBY_FAILURES]
    for type_, found, reason, event in (
            (C.COND_PREFIX_CONFLICT, ctx.prefix_conflicts, "HeldByAnotherJob", C.EV_PREFIX_CONFLICT),
            (C.COND_CHECKPOINT_MISSING, ctx.missing, "NotListed", C.EV_CHECKPOINT_MISSING),
            (C.COND_STANDBY_FAILING, standby_failing, "TooManyFailures", None),
            (C.COND_STORAGE_ERROR, ctx.storage_errors, "CannotAccess", None)):
        # Present once it was True (False: resolved), absent for jobs it never concerned.
        if not found and type_ not in old_conds:
            continue
        msg = "; ".join(found)
        if event and found and (old_conds.get(type_) or {}).get("status") != "True":
            ctx.note("Warning", event, msg)
        conds.append(_condition(old_conds, type_, bool(found),
                                reason if found else "Resolved", msg, ctx.now, generation))
    exact = _resume_exact_condition(ctx, cur, old_conds, generation)
    if exact is not None:
        conds.append(exact)
    status: dict[str, Any] = {
        "phase": phase.value,
        "currentPhase": current,
        "preemptions": sum(s.preemptions for s in statuses.values()),
        "failures": sum(s.failures for s in statuses.values()),
        "conditions": conds,
        "phases": [statuses[p.name].to_dict() for p in spec.phases],
    }
    if generation is not None:
        status["observedGeneration"] = generation
    last = cur.last_checkpoint if cur else None
    for key, value in (("step", last.step if last else None),
                       ("lastCheckpointTime", ts(last.time) if last and last.time else None)):
        if value is not None:
            status[key] = value
        elif key in old:
            # A merge patch never drops a key it does not mention: null deletes it, so the
            # printer columns do not go on showing the previous phase's checkpoint.
            status[key] = None
    return status
