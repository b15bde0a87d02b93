"""Attempts and their accounting: how the recorded attempt stands, which budget its end is
charged to (once per attempt: invariant 3, ``account``), adopting a pod the status does not
know yet, where the next attempt resumes from (``resume_point``: invariant 6, never step 0
while the status names a checkpoint), the number it gets (``fence_floor``: invariant 1, the
prefix's fence only grows) and its pods (``start_attempt``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

from .. import constants as C
from ..constants import Cause, PhaseState
from ..outcomes import Outcome, gone
from phoenix_trainer.core.contract import MAX_REASON_CHARS, REASON_PREEMPTED
from phoenix_trainer.core.layout import split_checkpoint_uri
from ..phoenixjob import CheckpointRef, Failure, PhaseSpec, PhaseStatus, bounded, parse_ts
from ..podspec import build_pod, build_service, gang_store, in_place_gang, pod_name
from ..states import Event, transition
from .gangs import gang_outcome
from .plan import (CONFLICT_RETRY_SECONDS, STORAGE_RETRY_SECONDS, AttemptEnd, Checkpoint,
                   CreatePod, Ctx, GangFence, Listing, Recovery)

S = PhaseState


def attempt_outcome(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus,
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
    return gang_outcome(ctx, phase, st, members)


def checkpoint_from(outcome: Outcome, st: PhaseStatus, when: datetime) -> CheckpointRef | None:
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


def describe(outcome: Outcome) -> str:
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


def _hung(st: PhaseStatus, outcome: Outcome) -> Outcome:
    """The operator ended this attempt as hung (``decide.hangs``): a failure, reason Hung,
    whatever the killed pod's exit says."""
    hang = st.last_hang
    if hang is None or hang.attempt != st.attempts or outcome.cause == Cause.COMPLETED:
        return outcome
    return replace(outcome, cause=Cause.FAILURE, reason=C.R_HUNG, message=hang.describe())


def account(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, outcome: Outcome,
             member: str | None = None, culprit: Mapping[str, Any] | None = None) -> PhaseStatus:
    """The recorded attempt ended: charge the right budget and move the state machine.
    ``member``: the pod that ended it (a gang's member that caused it); ``culprit``: that
    pod's object, if it still exists (its node and creation time go into the history)."""
    ended = outcome.finished_at or ctx.now
    outcome = _hung(st, _handed_off(st, outcome))
    pod = member or st.pod or pod_name(ctx.job, phase.name, st.attempts)
    if phase.replicas > 1 and outcome.cause != Cause.COMPLETED:
        pod = f"{pod} (gang member {pod.rsplit('.', 1)[-1]} of {phase.replicas})"
    st = replace(st, last_checkpoint=checkpoint_from(outcome, st, ended))
    tm = outcome.termination
    if tm and tm.resumeExact is not None:
        st = exactness(st, tm.resumeExact, tm.resumeExactReason)
    if outcome.cause == Cause.COMPLETED:
        _ended(ctx, phase, st, outcome, ended, member, culprit)
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
    _ended(ctx, phase, st, outcome, ended, member, culprit)
    what = describe(outcome)
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


def _ended(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, outcome: Outcome, ended: datetime,
           member: str | None, culprit: Mapping[str, Any] | None) -> None:
    """Tell the history (``Plan.ended``) how the attempt ended."""
    meta = (culprit or {}).get("metadata") or {}
    tm = outcome.termination
    ctx.plan.ended.append(AttemptEnd(
        phase=phase.name, attempt=st.attempts, cause=outcome.cause.value, reason=outcome.reason,
        ended=ended, pod=member or st.pod, node=((culprit or {}).get("spec") or {}).get("nodeName"),
        created=parse_ts(meta.get("creationTimestamp")), exit_code=outcome.exit_code,
        message=outcome.message, stopped_step=tm.step if tm else None,
        checkpoint=tm.checkpoint if tm else None, members=phase.replicas))


def exactness(st: PhaseStatus, exact: bool, reason: str) -> PhaseStatus:
    """The trainer's verdict, from a termination message or a manifest: text from outside,
    bounded here (a status the CRD refuses for its length fails every patch, for ever)."""
    return replace(st, resume_exact=exact, resume_exact_reason=bounded(reason, MAX_REASON_CHARS))


def _handed_off(st: PhaseStatus, outcome: Outcome) -> Outcome:
    """The trainer's "preempted" needs corroboration (outcomes.classify): the operator's own handoff
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


def _exhaust(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, ended: datetime,
             why: str) -> PhaseStatus:
    ctx.note("Warning", C.EV_BUDGET_EXHAUSTED, f"phase {phase.name}: {why}")
    ctx.note("Warning", C.EV_PHASE_FAILED, f"phase {phase.name} failed")
    msg = replace(st.last_failure, message=why) if st.last_failure else None
    return replace(st, state=transition(st.state, Event.EXHAUST), completed_at=ended,
                   next_attempt_at=None, last_failure=msg)


def adopt(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, attempt: int,
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


@dataclass(frozen=True)
class ResumePoint:
    """Where the next attempt starts: ``st`` updated with the fallback bookkeeping."""

    st: PhaseStatus
    chosen: Checkpoint | None
    init: Checkpoint | None


def resume_point(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus) -> ResumePoint | None:
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
        st = exactness(st, chosen.resume_exact, chosen.resume_exact_reason)
    st = replace(st, consecutive_failures_at_checkpoint=consecutive, skipped_steps=skipped,
                 last_checkpoint=last)
    return ResumePoint(st, chosen, init)


def start_attempt(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, event: Event) -> PhaseStatus:
    """Create the next attempt's pod, resuming from the newest checkpoint verified valid."""
    point = resume_point(ctx, phase, st)
    if point is None:
        return st
    st, chosen, init = point.st, point.chosen, point.init
    floor = fence_floor(ctx, phase, st, ctx.checkpoints[phase.name])
    if floor is None:
        return st  # another live job holds the prefix
    resume = chosen.uri if chosen else None
    attempt = st.attempts if event == Event.RECREATE else max(st.next_attempt_number, floor + 1)
    previous = st.last_failure if event == Event.REPLACE else None
    members: list[int | None] = list(range(phase.replicas)) if phase.replicas > 1 else [None]
    if phase.replicas > 1:
        ctx.plan.services.append(build_service(job=ctx.job, namespace=ctx.namespace, phase=phase.name))
    names = [pod_name(ctx.job, phase.name, attempt, m) for m in members]
    gang = (GangFence(tuple(names), gang_store(ctx.job, ctx.namespace, phase.name, 0, attempt), 0)
            if in_place_gang(ctx.spec, phase) else None)
    for member in members:  # a gang all at once: the scheduler sees every member together
        manifest = build_pod(job=ctx.job, namespace=ctx.namespace, spec=ctx.spec, phase=phase,
                             attempt=attempt, resume_from=resume,
                             resume_step=chosen.step if chosen else None,
                             init_from=init.uri if init else None, member=member,
                             job_uid=ctx.uid)
        first = member in (None, 0)  # time-to-replacement is observed once per attempt
        ctx.plan.create.append(CreatePod(
            name=manifest["metadata"]["name"], phase=phase.name, attempt=attempt,
            manifest=manifest, resume_from=resume,
            previous_end=previous.time if previous and first else None,
            previous_cause=previous.cause if previous and first else None, gang=gang))
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
                   started_at=st.started_at or ctx.now, last_attempt=max(st.last_attempt, attempt),
                   members=(), spare_members=())


def fence_floor(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, listing: Listing) -> int | None:
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
