"""The per-phase state machine, written down once as a table of legal transitions.

Every state change in ``decide`` goes through ``transition``; an edge that is not in the
table is a bug and raises, so a new code path cannot quietly invent a state change.
The job-level ``status.phase`` is not a machine of its own: it is derived from the phases
by ``job_phase``.
"""
from __future__ import annotations

from enum import Enum

from .constants import JobPhase, PhaseState, TERMINAL_PHASE_STATES

S = PhaseState


class Event(str, Enum):
    START = "start"          # dependencies met; first pod created (or adopted)
    BLOCK = "block"          # a dependency failed and this phase is not independent
    SUCCEED = "succeed"      # the trainer exited 0
    PREEMPT = "preempt"      # the pod ended by preemption; replacement due at once
    FAIL = "fail"            # the pod failed; replacement due after backoff
    EXHAUST = "exhaust"      # a budget ran out
    REPLACE = "replace"      # replacement pod created (or adopted)
    SUSPEND = "suspend"      # spec.suspend set
    RESUME = "resume"        # spec.suspend cleared and the old pod is gone
    RECREATE = "recreate"    # status names a pod that was never created (crash in between)
    RESET = "reset"          # a user's `phoenixctl reset` after fixing the cause (reset.py)


E = Event

TRANSITIONS: dict[tuple[PhaseState, Event], PhaseState] = {
    (S.PENDING, E.START): S.RUNNING,
    (S.PENDING, E.BLOCK): S.BLOCKED,
    (S.RUNNING, E.SUCCEED): S.SUCCEEDED,
    (S.RUNNING, E.PREEMPT): S.RECOVERING,
    (S.RUNNING, E.FAIL): S.RECOVERING,
    (S.RUNNING, E.EXHAUST): S.FAILED,
    (S.RUNNING, E.SUSPEND): S.SUSPENDED,
    (S.RUNNING, E.RECREATE): S.RUNNING,
    (S.RECOVERING, E.REPLACE): S.RUNNING,
    (S.RECOVERING, E.SUSPEND): S.SUSPENDED,
    (S.SUSPENDED, E.SUCCEED): S.SUCCEEDED,   # it finished inside its grace period
    (S.SUSPENDED, E.RESUME): S.RECOVERING,
    # Terminal for the operator; only a person leaves them, through `phoenixctl reset`.
    (S.FAILED, E.RESET): S.PENDING,
    (S.BLOCKED, E.RESET): S.PENDING,
}


class IllegalTransition(RuntimeError):
    pass


def transition(state: PhaseState, event: Event) -> PhaseState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(
            f"no transition from {state.value} on {event.value}; see states.TRANSITIONS") from None


def is_terminal(state: PhaseState) -> bool:
    return state in TERMINAL_PHASE_STATES


def job_phase(states: list[PhaseState], suspend: bool) -> JobPhase:
    """Aggregate phase states into ``status.phase`` (first matching rule wins)."""
    if states and all(s == S.SUCCEEDED for s in states):
        return JobPhase.SUCCEEDED
    if states and all(is_terminal(s) for s in states):
        return JobPhase.FAILED
    if suspend:
        return JobPhase.SUSPENDED
    if any(s in (S.RECOVERING, S.SUSPENDED) for s in states):
        return JobPhase.RECOVERING
    if any(s == S.RUNNING for s in states):
        return JobPhase.RUNNING
    return JobPhase.PENDING
