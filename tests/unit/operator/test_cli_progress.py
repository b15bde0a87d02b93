"""`phoenix status`: the running attempt's last step, hang deadline, stragglers, last hang."""
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
