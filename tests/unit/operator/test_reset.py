"""`phoenixctl reset`: the new status, computed without a cluster; then decide() picks it up."""
import pytest

from phoenix_operator.decide import decide
from phoenix_operator.phoenixjob import JobSpec, ts
from phoenix_operator.reset import ResetRefused, reset_status

from opfacts import at, job, listing, phase_status, status

pytestmark = pytest.mark.unit

FAILED = phase_status(state="Failed", attempts=4, failures=3, preemptions=2,
                      consecutiveFailuresAtCheckpoint=2, skippedSteps=[20],
                      nextAttemptAt=ts(at(5)), completedAt=ts(at(9)),
                      resumeFrom="s3://bucket/run/train/step-00000010",
                      lastFailure={"cause": "failure", "reason": "Error", "exitCode": 1,
                                   "message": "boom", "time": ts(at(9)), "attempt": 4})
BLOCKED = {"name": "finetune", "state": "Blocked", "attempts": 0, "preemptions": 0,
           "failures": 0, "completedAt": ts(at(9))}
THREE = ("train", "finetune", "eval")


def body(*phases, names=THREE, **kw):
    b = job(names, **kw)
    b["status"] = status(*phases, phase="Failed")
    b["status"]["failures"] = 3
    return b


def by_name(st):
    return {p["name"]: p for p in st["phases"]}


def test_failed_phase_and_the_phases_it_blocked_are_pending_again():
    b = body(FAILED, BLOCKED, phase_status(name="eval", state="Succeeded"))
    new, names = reset_status(JobSpec.parse(b["spec"]), b["status"], "train")
    assert names == ["train", "finetune"]
    p = by_name(new)
    train = p["train"]
    assert train["state"] == "Pending" and train["attempts"] == 4  # names stay unique
    assert train["failures"] == 0 and train["preemptions"] == 0
    assert train["consecutiveFailuresAtCheckpoint"] == 0 and train["skippedSteps"] == []
    for gone in ("nextAttemptAt", "completedAt", "podUID", "pod", "startedAt"):
        assert gone not in train
    assert train["lastFailure"]["message"] == "boom"  # history kept
    assert p["finetune"]["state"] == "Pending" and "completedAt" not in p["finetune"]
    assert p["eval"]["state"] == "Succeeded"
    assert new["phase"] == "Pending" and new["failures"] == 0 and new["preemptions"] == 0


def test_without_phase_every_failed_and_blocked_phase_is_reset():
    b = body(FAILED, BLOCKED, phase_status(name="eval", state="Failed", failures=1))
    _, names = reset_status(JobSpec.parse(b["spec"]), b["status"])
    assert names == list(THREE)


def test_blocked_by_another_failed_phase_is_left_alone():
    b = body(FAILED, phase_status(name="finetune", state="Failed", failures=4),
             {"name": "eval", "state": "Blocked", "attempts": 0},
             depends={"eval": ["finetune"]})
    _, names = reset_status(JobSpec.parse(b["spec"]), b["status"], "train")
    assert names == ["train"]


def test_nothing_to_reset():
    b = body(phase_status(state="Succeeded"), names=("train",))
    new, names = reset_status(JobSpec.parse(b["spec"]), b["status"])
    assert names == [] and by_name(new)["train"]["state"] == "Succeeded"


@pytest.mark.parametrize("phase,state,why", [
    ("train", "Succeeded", "only a Failed or Blocked phase"),
    ("nope", "Failed", "no phase 'nope'"),
])
def test_refuses_what_cannot_be_reset(phase, state, why):
    b = body(phase_status(state=state), names=("train",))
    with pytest.raises(ResetRefused, match=why):
        reset_status(JobSpec.parse(b["spec"]), b["status"], phase)


@pytest.mark.parametrize("busy", ["Running", "Recovering"])
def test_refuses_while_a_phase_runs_unless_forced(busy):
    b = body(FAILED, BLOCKED, phase_status(name="eval", state=busy))
    spec = JobSpec.parse(b["spec"])
    with pytest.raises(ResetRefused, match="eval is still running.*--force"):
        reset_status(spec, b["status"], "train")
    _, names = reset_status(spec, b["status"], "train", force=True)
    assert names == ["train", "finetune"]


def test_operator_restarts_the_reset_phase_from_the_newest_valid_checkpoint():
    b = body(FAILED, names=("train",))
    b["status"], _ = reset_status(JobSpec.parse(b["spec"]), b["status"])
    plan = decide(b, [], {"train": listing(10, 20, 30, invalid=(30,))}, at(100))
    assert [c.name for c in plan.create] == ["j.train-5"]
    env = {e["name"]: e.get("value") for e in plan.create[0].manifest["spec"]["containers"][0]
           ["env"]}
    # step 20 was skipped as "crashes repeatedly"; the user's reset forgets that
    assert env["PHOENIX_RESUME_FROM"].endswith("step-00000020")
    assert env["PHOENIX_ATTEMPT"] == "5"
    assert plan.status["phase"] == "Running"
