"""decide.hangs: a running attempt with no progress is ended as Hung after its stack dumps;
stragglers get a condition; the status carries progress (pure, no storage)."""
from __future__ import annotations

import pytest

from phoenix_operator import constants as C
from phoenix_operator.decide import PhaseProgress, RankProgress, decide
from phoenix_operator.podspec import pod_name
from phoenix_trainer.core.heartbeat import DUMP_GRACE_SECONDS, HANG_FLOOR_SECONDS

from opfacts import at, job, phase_status, pod, with_status

pytestmark = pytest.mark.unit

POD = pod_name("j", "train", 1)
DUMP = "s3://bucket/run/train/hangs/attempt-1/rank-0.txt"


def running(recovery=None, **status):
    body = job(recovery=recovery or {"maxFailures": 3})
    return with_status(body, phase_status(**status)), [pod(node="n1")]


def rank(r=0, *, stalled=1.0, step=100, activity="training", dump="", **kw):
    return RankProgress(rank=r, pod=pod_name("j", "train", 1), step=step, activity=activity,
                        stalled=stalled, step_p50=0.1, step_p95=0.2, stack_dump=dump, **kw)


def run(body, pods, *ranks, now=at(100)):
    return decide(body, pods, {}, now, progress={"train": PhaseProgress(1, tuple(ranks))})


def phase(plan):
    return plan.status["phases"][0]


def test_progress_is_recorded_and_the_pass_comes_back_when_a_hang_could_first_be_due():
    body, pods = running()
    plan = run(body, pods, rank(stalled=2.0))
    prog = phase(plan)["progress"]
    assert prog["step"] == 100 and prog["hangTimeoutSeconds"] == HANG_FLOOR_SECONDS
    assert prog["lastStepTime"] == "2026-01-01T12:01:38Z"  # now - 2 s
    assert plan.status["lastStepTime"] == prog["lastStepTime"]
    assert plan.requeue_after == 30.0 and not plan.delete
    plan = run(body, pods, rank(stalled=HANG_FLOOR_SECONDS - 20))
    assert plan.requeue_after == pytest.approx(20.0)


def test_a_stall_waits_for_the_stack_dump_then_ends_the_attempt_as_hung():
    body, pods = running(recovery={"maxFailures": 3, "hangTimeoutSeconds": 30})
    plan = run(body, pods, rank(stalled=31))  # past the timeout, no dump yet
    assert not plan.delete and plan.requeue_after <= 5.0
    plan = run(body, pods, rank(stalled=33, dump=DUMP))
    assert [(d.name, d.reason, d.grace_seconds) for d in plan.delete] == [(POD, C.R_HUNG, 2)]
    hang = phase(plan)["lastHang"]
    assert hang["rank"] == 0 and hang["stackDumps"] == [DUMP] and hang["timeoutSeconds"] == 30
    assert phase(plan)["hangs"] == 1
    event = next(e for e in plan.events if e.reason == C.EV_HUNG)
    assert "no step for 33s (hang timeout 30s) after step 100" in event.message and DUMP in event.message

    # the pod ends (killed): a failure with reason Hung, and a replacement after the backoff
    body["status"] = plan.status
    again = run(body, pods, rank(stalled=40, dump=DUMP))
    assert not again.delete  # decided once
    ended = [pod(exit_code=137, pod_phase="Failed", finished=at(101), node="n1")]
    plan = decide(body, ended, {}, at(102))
    st = phase(plan)
    assert st["failures"] == 1 and st["lastFailure"]["reason"] == C.R_HUNG
    assert "rank 0" in st["lastFailure"]["message"]
    assert st["state"] == "Recovering"


def test_a_frozen_rank_writes_no_dump_so_the_operator_waits_only_the_grace():
    body, pods = running(recovery={"hangTimeoutSeconds": 30})
    assert not run(body, pods, rank(stalled=31, frozen=True), rank(1, stalled=31)).delete
    plan = run(body, pods, rank(stalled=31, frozen=True), rank(1, stalled=31, dump=DUMP))
    assert plan.delete and phase(plan)["lastHang"]["rank"] == 0  # frozen: stopped first
    plan = run(body, pods, rank(stalled=30 + DUMP_GRACE_SECONDS, frozen=True))
    assert plan.delete and phase(plan)["lastHang"]["stackDumps"] == []


def test_the_rank_that_stopped_first_is_behind_or_not_yet_in_the_collective():
    body, pods = running(recovery={"hangTimeoutSeconds": 30})
    plan = run(body, pods, rank(0, stalled=40, dump="a", in_collective=True),
               rank(1, stalled=40, dump="b"), rank(2, stalled=40, dump="c", in_collective=True))
    assert phase(plan)["lastHang"]["rank"] == 1
    plan = run(body, pods, rank(0, stalled=40, dump="a", step=101), rank(1, stalled=35, dump="b"))
    assert phase(plan)["lastHang"]["rank"] == 1
    # heartbeats of ranks waiting in the collective froze (their storage writes stalled): the
    # rank that never entered it is still the one named
    plan = run(body, pods, rank(0, stalled=40, dump="a", in_collective=True),
               rank(2, stalled=45, frozen=True, in_collective=True),
               rank(1, stalled=40, dump="b"))
    assert phase(plan)["lastHang"]["rank"] == 1
    # ... even when those frozen heartbeats are older, so their steps lag (seen in CI)
    plan = run(body, pods, rank(0, stalled=40, dump="a", in_collective=True),
               rank(2, stalled=50, frozen=True, step=40), rank(3, stalled=50, frozen=True, step=40),
               rank(1, stalled=40, dump="b"))
    assert phase(plan)["lastHang"]["rank"] == 1
    # every fresh rank waits in the collective: the frozen one (SIGSTOP) stopped first
    plan = run(body, pods, rank(0, stalled=40, dump="a", in_collective=True),
               rank(1, stalled=40, dump="b", in_collective=True, step=99),
               rank(2, stalled=45, frozen=True, step=100))
    assert phase(plan)["lastHang"]["rank"] == 2


@pytest.mark.parametrize("activity", ["starting", "standby", "finishing"])
def test_unwatched_activities_never_hang(activity):
    body, pods = running(recovery={"hangTimeoutSeconds": 30})
    assert not run(body, pods, rank(stalled=10_000, activity=activity, dump=DUMP)).delete


def test_a_restore_gets_ten_minutes_and_hang_detection_can_be_off():
    body, pods = running()
    assert not run(body, pods, rank(stalled=500, activity="restoring", dump=DUMP)).delete
    assert run(body, pods, rank(stalled=601, activity="restoring", dump=DUMP)).delete
    body, pods = running(recovery={"hangDetection": False})
    assert not run(body, pods, rank(stalled=10_000, dump=DUMP)).delete


def test_heartbeats_of_another_attempt_or_a_failed_read_decide_nothing():
    body, pods = running(recovery={"hangTimeoutSeconds": 30})
    plan = decide(body, pods, {}, at(100), progress={"train": PhaseProgress(
        2, (rank(stalled=99, dump=DUMP),))})
    assert not plan.delete and "progress" not in phase(plan)
    plan = decide(body, pods, {}, at(100), progress={"train": PhaseProgress(1, error="boom")})
    assert not plan.delete and plan.requeue_after is None


def test_a_straggler_gets_a_condition_and_one_event_naming_rank_pod_and_node():
    body, pods = running()

    def ranks(slow):
        return [rank(r, compute_p50=(0.3 if r == slow else 0.1), steps_timed=50,
                     node=f"n{r}") for r in range(3)]

    plan = run(body, pods, *ranks(2))
    cond = {c["type"]: c for c in plan.status["conditions"]}[C.COND_STRAGGLER]
    assert cond["status"] == "True" and "rank 2" in cond["message"] and "node n2" in cond["message"]
    assert [e.reason for e in plan.events].count(C.EV_STRAGGLER) == 1
    assert phase(plan)["progress"]["stragglers"][0]["rank"] == 2
    body["status"] = plan.status
    plan = run(body, pods, *ranks(2))
    assert C.EV_STRAGGLER not in [e.reason for e in plan.events]  # said once
    body["status"] = plan.status
    plan = run(body, pods, *ranks(None))
    cond = {c["type"]: c for c in plan.status["conditions"]}[C.COND_STRAGGLER]
    assert cond["status"] == "False"


def test_the_operator_remembers_how_long_each_heartbeat_stayed_unchanged():
    from phoenix_operator.gather import Heartbeats
    from phoenix_trainer.core.heartbeat import Heartbeat

    now = [100.0]
    hbs = Heartbeats(clock=lambda: now[0])
    at = (("ns", "j"), "train", 1)
    assert hbs.fresh(at) is None
    beat = Heartbeat(attempt=1, rank=0, beat=7)
    hbs.store(at, [beat], {})
    assert hbs.fresh(at) == ([beat], {})
    now[0] += Heartbeats.READ_SECONDS
    assert hbs.fresh(at) is None  # read again
    hbs.store(at, [beat], {})  # the same beat: a frozen writer
    assert hbs.unchanged_for(at, beat) == Heartbeats.READ_SECONDS
    newer = Heartbeat(attempt=1, rank=0, beat=8)
    hbs.store(at, [newer], {})
    assert hbs.unchanged_for(at, newer) == 0.0
    empty = (("ns", "k"), "train", 1)
    hbs.store(empty, [], {})  # nothing written yet: listed again only after a while
    now[0] += Heartbeats.READ_SECONDS
    assert hbs.fresh(empty) == ([], {})
    hbs.store((("ns", "j"), "train", 2), [], {})  # a new attempt drops the old one's
    assert hbs.fresh(at) is None and hbs.unchanged_for(at, newer) == 0.0
    hbs.forget(("ns", "k"))
    assert hbs.fresh(empty) is None
