"""``phoenixctl reset``: what a job's status becomes when a user re-runs a failed phase.

Pure: takes the spec and the status as the API returned them and returns the new status (or
refuses, saying why); the CLI reads and writes the cluster. The operator then sees a Pending
phase and starts its next attempt from the newest valid checkpoint, as for any start.

A reset phase keeps its attempt counter (pod names ``<job>.<phase>-<attempt>`` stay unique
and the old pods' logs stay where they are), its last checkpoint and its last failure (the
history); it loses its budgets' counts and the "this checkpoint keeps crashing" bookkeeping,
since the user says the cause is fixed.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from .constants import PhaseState
from .phoenixjob import JobSpec, PhaseStatus, phase_statuses
from .states import Event, job_phase, transition

S = PhaseState
RESETTABLE = (S.FAILED, S.BLOCKED)
BUSY = (S.RUNNING, S.RECOVERING)


class ResetRefused(ValueError):
    """The reset would be unsafe or meaningless; the message says why and what to do."""


def _unblocked(spec: JobSpec, statuses: Mapping[str, PhaseStatus], roots: set[str]) -> set[str]:
    """``roots`` plus the Blocked phases that resetting them unblocks (directly or through
    another such phase); one still blocked by a phase left Failed stays Blocked."""
    out = set(roots)
    for p in spec.phases:  # dependsOn names earlier phases only (CEL), so one pass suffices
        if p.name in out or statuses[p.name].state != S.BLOCKED:
            continue
        broken = [d for d in p.depends_on if d in statuses and statuses[d].state in RESETTABLE]
        if broken and all(d in out for d in broken):
            out.add(p.name)
    return out


def reset_status(spec: JobSpec, status: Mapping[str, Any] | None, phase: str | None = None,
                 force: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The status after resetting ``phase`` (None: every Failed/Blocked phase) and the phases
    Blocked by it. Returns (new status, names reset); raises ``ResetRefused``."""
    statuses = phase_statuses(spec, status)
    if phase is not None:
        if phase not in statuses:
            raise ResetRefused(f"no phase {phase!r}; phases: {', '.join(statuses)}")
        if statuses[phase].state not in RESETTABLE:
            raise ResetRefused(f"phase {phase} is {statuses[phase].state.value}; only a Failed "
                               "or Blocked phase can be reset")
        roots = {phase}
    else:
        roots = {n for n, st in statuses.items() if st.state in RESETTABLE}
    targets = _unblocked(spec, statuses, roots)
    busy = [n for n, st in statuses.items() if st.state in BUSY]
    if targets and busy and not force:
        raise ResetRefused(f"phase {', '.join(busy)} is still running or recovering; wait for "
                           "it to finish, or pass --force to reset anyway")
    for name in targets:
        statuses[name] = _fresh(statuses[name])
    new = dict(status or {})
    new["phases"] = [statuses[p.name].to_dict() for p in spec.phases]
    new["phase"] = job_phase([statuses[p.name].state for p in spec.phases], spec.suspend).value
    new["preemptions"] = sum(s.preemptions for s in statuses.values())
    new["failures"] = sum(s.failures for s in statuses.values())
    return new, [p.name for p in spec.phases if p.name in targets]


def _fresh(st: PhaseStatus) -> PhaseStatus:
    return replace(st, state=transition(st.state, Event.RESET), preemptions=0, failures=0,
                   consecutive_failures_at_checkpoint=0, skipped_steps=(), pod=None, pod_uid=None,
                   next_attempt_at=None, completed_at=None, started_at=None)
