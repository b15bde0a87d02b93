"""The job's status from its phases' states: ``status.phase``, the current phase, the
conditions (each with the reason and message a person reads) and the events that go with a
condition turning True.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping

from .. import constants as C
from ..constants import Cause, JobPhase, PhaseState
from ..phoenixjob import JobSpec, PhaseStatus, ts
from ..states import job_phase
from .plan import Ctx

S = PhaseState


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


def _resume_exact_condition(ctx: Ctx, cur: PhaseStatus | None,
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


def job_status(ctx: Ctx, statuses: Mapping[str, PhaseStatus], old: Mapping[str, Any],
               generation: int | None) -> dict[str, Any]:
    spec = ctx.spec
    phase = job_phase([statuses[p.name].state for p in spec.phases], spec.suspend)
    current = _current_phase(spec, statuses)
    cur = statuses.get(current) if current else None
    old_conds = {c.get("type"): c for c in old.get("conditions") or () if c.get("type")}
    conds = _phase_conditions(ctx, statuses, phase, current, cur, old_conds, generation)
    conds += _sticky_conditions(ctx, statuses, old_conds, generation)
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
    if "history" in old:  # the history's summary: written by apply's ``history`` step only
        status["history"] = old["history"]
    last = cur.last_checkpoint if cur else None
    prog = cur.progress if cur and cur.state == S.RUNNING and cur.progress is not None and cur.progress.attempt == cur.attempts else None
    for key, value in (("step", last.step if last else None),
                       ("lastCheckpointTime", ts(last.time) if last and last.time else None),
                       ("lastStepTime", ts(prog.last_step_time) if prog else None)):
        if value is not None:
            status[key] = value
        elif key in old:
            # A merge patch never drops a key it does not mention: null deletes it, so the
            # printer columns do not go on showing the previous phase's checkpoint.
            status[key] = None
    return status


def _phase_conditions(ctx: Ctx, statuses: Mapping[str, PhaseStatus], phase: JobPhase,
                      current: str | None, cur: PhaseStatus | None,
                      old_conds: Mapping[str, Mapping[str, Any]],
                      generation: int | None) -> list[dict[str, Any]]:
    """The conditions every job has: Running, Recovering, Suspended, Succeeded, Failed,
    PodConflict."""
    spec = ctx.spec
    running_reason, running_msg = _running_text(ctx, phase, current, cur, old_conds)
    recovering_reason, recovering_msg = _recovering_text(ctx, current, cur)
    failed_msg = failure_summary(spec, statuses) if phase == JobPhase.FAILED else ""
    conflict_msg = "; ".join(ctx.conflicts)
    if ctx.conflicts and (old_conds.get(C.COND_POD_CONFLICT) or {}).get("status") != "True":
        ctx.note("Warning", C.EV_POD_CONFLICT, conflict_msg)
    return [
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


def _running_text(ctx: Ctx, phase: JobPhase, current: str | None, cur: PhaseStatus | None,
                  old_conds: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """The Running condition's reason and message (a stranded pod says so, once)."""
    running_msg = (f"phase {current} attempt {cur.attempts} running in pod {cur.pod}"
                   if cur and cur.state == S.RUNNING else "no trainer pod running")
    running_reason = "TrainerRunning" if phase == JobPhase.RUNNING else phase.value
    if ctx.stranded:
        running_reason, running_msg = C.REASON_NODE_NOT_READY, "; ".join(ctx.stranded)
        if (old_conds.get(C.COND_RUNNING) or {}).get("reason") != running_reason:
            ctx.note("Warning", C.EV_NODE_NOT_READY, running_msg)
    return running_reason, running_msg


def _recovering_text(ctx: Ctx, current: str | None, cur: PhaseStatus | None) -> tuple[str, str]:
    """The Recovering condition's reason and message."""
    if not (cur and cur.state == S.RECOVERING and cur.last_failure):
        return "NotRecovering", ""
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
    return recovering_reason, recovering_msg


def _sticky_conditions(ctx: Ctx, statuses: Mapping[str, PhaseStatus],
                       old_conds: Mapping[str, Mapping[str, Any]],
                       generation: int | None) -> list[dict[str, Any]]:
    """PrefixConflict, CheckpointMissing, StandbyFailing, StorageError, Straggler: present once they
    were True (False: resolved), absent for jobs they never concerned."""
    standby_failing = [
        f"phase {s.name}: {s.standby_failures} standbys in a row failed before one became ready;"
        f" attempt {s.attempts} keeps none any more (the last standby pod's logs say why; the "
        "next attempt tries again)"
        for s in statuses.values()
        if s.state == S.RUNNING and s.standby_failures >= C.MAX_STANDBY_FAILURES]
    slow = [f"phase {s.name}: {g.describe()}" for s in statuses.values()
            if s.state == S.RUNNING and s.progress is not None and s.progress.attempt == s.attempts
            for g in s.progress.stragglers]
    conds = []
    for type_, found, reason, event in (
            (C.COND_STRAGGLER, slow, "SlowRank", C.EV_STRAGGLER),
            (C.COND_PREFIX_CONFLICT, ctx.prefix_conflicts, "HeldByAnotherJob", C.EV_PREFIX_CONFLICT),
            (C.COND_CHECKPOINT_MISSING, ctx.missing, "NotListed", C.EV_CHECKPOINT_MISSING),
            (C.COND_STANDBY_FAILING, standby_failing, "TooManyFailures", None),
            (C.COND_STORAGE_ERROR, ctx.storage_errors, "CannotAccess", None)):
        if not found and type_ not in old_conds:
            continue
        msg = "; ".join(found)
        if event and found and (old_conds.get(type_) or {}).get("status") != "True":
            ctx.note("Warning", event, msg)
        conds.append(_condition(old_conds, type_, bool(found),
                                reason if found else "Resolved", msg, ctx.now, generation))
    return conds
