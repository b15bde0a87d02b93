"""`phoenixctl status`: the running attempt's last step, hang deadline, stragglers, last hang."""
from __future__ import annotations

from datetime import timedelta

import pytest

from phoenix_operator.kubectl_phoenix import progress_lines
from phoenix_operator.phoenixjob import (Hang, JobSpec, PhaseStatus, ProgressRef, Straggler)
from phoenix_operator.constants import PhaseState

from opfacts import at

pytestmark = pytest.mark.unit


def test_progress_deadline_stragglers_and_last_hang_are_shown():
    slow = Straggler(rank=1, pod="j-train-2-1", node="n2", compute_seconds=0.3, others_seconds=0.1)
    ps = PhaseStatus(name="train", state=PhaseState.RUNNING, attempts=2,
                     progress=ProgressRef(attempt=2, step=420, last_step_time=at(0),
                                          hang_timeout=180, step_seconds=0.11, stragglers=(slow,)),
                     last_hang=Hang(attempt=1, time=at(-600), step=60, stalled_seconds=21,
                                    timeout_seconds=20, rank=0, pod="j-train-1",
                                    stack_dumps=("s3://b/j/train/hangs/attempt-1/rank-0.txt",)))
    rec = JobSpec.parse({"phases": [{"name": "train"}]}).recovery
    lines = progress_lines(ps, rec, at(12))
    assert lines[0] == "  last step: 420 (12s ago, 0.11s/step); hung after 180s without progress (168s left)"
    assert "rank 1 (pod j-train-2-1 on node n2)" in lines[1]
    assert lines[2].startswith("  last hang: attempt 1 (10m ago): no step for 21s (hang timeout 20s)")
    assert "rank-0.txt" in lines[2]
    rec_off = JobSpec.parse({"phases": [{"name": "train"}], "recovery": {"hangDetection": False}}).recovery
    assert progress_lines(ps, rec_off, at(12) + timedelta(0))[0].endswith("hang detection off")


def test_an_in_place_replacement_is_shown_with_where_the_state_came_from():
    from phoenix_operator.phoenixjob import Replacement
    r = Replacement(attempt=3, time=at(-30), members=(1,), lost=("j.train-2.1",),
                    pods=("j.train-3.1",), cause="preemption", reason="EvictionByEvictionAPI",
                    recovered_from="peers", resumed_step=212, training_again_seconds=7.2)
    ps = PhaseStatus(name="train", state=PhaseState.RUNNING, attempts=3, replacements=2,
                     last_replacement=r)
    rec = JobSpec.parse({"phases": [{"name": "train"}]}).recovery
    assert progress_lines(ps, rec, at(0)) == [
        "  members replaced: 2 time(s); last 30s ago: member 1 (j.train-2.1 -> j.train-3.1): "
        "EvictionByEvictionAPI (preemption); the gang continues as attempt 3; state from peers "
        "at step 212; every rank training again after 7.2s"]
    assert PhaseStatus.from_dict(ps.to_dict()) == ps


def test_a_spare_that_took_a_place_and_the_next_spare_waiting_are_shown():
    from phoenix_operator.kubectl_phoenix import _members
    from phoenix_operator.phoenixjob import Replacement, StandbyRef
    r = Replacement(attempt=3, time=at(-30), members=(1,), lost=("j.train-1.1",),
                    pods=("j.train-2.spare",), cause="preemption", reason="NodeLost",
                    spare="j.train-2.spare", training_again_seconds=3.1)
    ps = PhaseStatus(name="train", state=PhaseState.RUNNING, attempts=3, replacements=1,
                     last_replacement=r, members=(1, 2, 1), spare_members=(1,),
                     standby=StandbyRef(pod="j.train-4.spare", attempt=4, reason="spare",
                                        since=at(-10), node="n9", ready=True))
    rec = JobSpec.parse({"phases": [{"name": "train"}]}).recovery
    lines = progress_lines(ps, rec, at(0))
    assert "member 1 (j.train-1.1 -> spare j.train-2.spare)" in lines[0]
    assert lines[-1] == ("  spare: pod j.train-4.spare (attempt 4) on n9, ready (10s ago); takes"
                         " the next lost member's place")
    assert PhaseStatus.from_dict(ps.to_dict()) == ps

    def pod(name, attempt, member=None, spare=False):
        labels = {"phoenix.dev/phase": "train", "phoenix.dev/attempt": str(attempt)}
        if member is not None:
            labels["phoenix.dev/member"] = str(member)
        if spare:
            labels.update({"phoenix.dev/spare": "true", "phoenix.dev/standby": "true"})
        return {"metadata": {"name": name, "labels": labels}}
    pods = [pod("j.train-1.0", 1, 0), pod("j.train-1.1", 1, 1), pod("j.train-1.2", 1, 2),
            pod("j.train-2.spare", 2, spare=True), pod("j.train-4.spare", 4, spare=True)]
    assert [p["metadata"]["name"] for p in _members(pods, "train", ps, 3)] == [
        "j.train-1.0", "j.train-2.spare", "j.train-1.2"]
