"""The phase state machine table and the job-level aggregate."""
import itertools

import pytest

from phoenix_operator.constants import JobPhase, PhaseState as S
from phoenix_operator.states import (
    TRANSITIONS, Event, IllegalTransition, is_terminal, job_phase, transition)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("state,event", list(itertools.product(S, Event)),
                         ids=lambda v: v.value)
def test_every_pair_is_either_in_the_table_or_illegal(state, event):
    if (state, event) in TRANSITIONS:
        assert transition(state, event) == TRANSITIONS[(state, event)]
    else:
        with pytest.raises(IllegalTransition):
            transition(state, event)


def test_terminal_states_have_no_way_out_but_a_user_reset():
    for (state, event), _ in TRANSITIONS.items():
        assert not is_terminal(state) or event == Event.RESET
    # a succeeded phase never runs again, not even on request
    assert (S.SUCCEEDED, Event.RESET) not in TRANSITIONS


@pytest.mark.parametrize("states,suspend,expected", [
    ([S.SUCCEEDED, S.SUCCEEDED], False, JobPhase.SUCCEEDED),
    ([S.SUCCEEDED, S.FAILED], False, JobPhase.FAILED),
    ([S.FAILED, S.BLOCKED], True, JobPhase.FAILED),
    ([S.RUNNING, S.PENDING], True, JobPhase.SUSPENDED),
    ([S.SUCCEEDED, S.RECOVERING], False, JobPhase.RECOVERING),
    ([S.SUSPENDED], False, JobPhase.RECOVERING),
    ([S.FAILED, S.RUNNING], False, JobPhase.RUNNING),
    ([S.PENDING], False, JobPhase.PENDING),
])
def test_job_phase(states, suspend, expected):
    assert job_phase(states, suspend) == expected
