"""status.phases[].lastCheckpoint names a checkpoint that exists: its own step, not the step
the trainer had reached when it stopped without an emergency save."""
import json

import pytest

from phoenix_operator.decide import Checkpoint, Listing, decide

from opfacts import at, job, phase_status, pod, with_status

pytestmark = pytest.mark.unit

RESUMED = "s3://bucket/run/train/step-0000002000"


def listing(*steps: int) -> dict:
    return {"train": Listing(tuple(Checkpoint(step=s, uri=f"s3://bucket/run/train/step-{s:010d}",
                                              valid=True) for s in steps))}


def preempted_pod(checkpoint: str, step: int, saved: bool) -> dict:
    p = pod(pod_phase="Failed", exit_code=143, term_reason="preempted",
            disruption="EvictionByEvictionAPI")
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    term["message"] = json.dumps({"reason": "preempted", "step": step, "checkpoint": checkpoint,
                                  "emergencySaveCompleted": saved, "message": "SIGTERM"})
    return p


def last_checkpoint(plan) -> dict:
    return next(p for p in plan.status["phases"] if p["name"] == "train")["lastCheckpoint"]


def test_no_emergency_save_keeps_the_resumed_checkpoints_step():
    body = with_status(job(), phase_status(lastCheckpoint={"uri": RESUMED, "step": 2000}))
    plan = decide(body, [preempted_pod(RESUMED, 2036, saved=False)],
                  listing(2000), at(5))
    assert last_checkpoint(plan)["uri"] == RESUMED
    assert last_checkpoint(plan)["step"] == 2000


def test_first_attempt_without_a_recorded_checkpoint_takes_the_uris_step():
    plan = decide(with_status(job(), phase_status()),
                  [preempted_pod(RESUMED, 2036, saved=False)], listing(2000), at(5))
    assert last_checkpoint(plan)["step"] == 2000


def test_emergency_save_is_recorded_at_its_step():
    saved = "s3://bucket/run/train/step-0000002036"
    body = with_status(job(), phase_status(lastCheckpoint={"uri": RESUMED, "step": 2000}))
    plan = decide(body, [preempted_pod(saved, 2036, saved=True)],
                  listing(2000, 2036), at(5))
    assert last_checkpoint(plan)["step"] == 2036
