"""phoenix_lab.samples from trainers' metrics: ``divergence`` (a failed weights check says where
the run parted from its reference: the first step whose logged loss differs, the attempt and
where it started) and ``attempt_ends`` (the step each attempt reached)."""
from __future__ import annotations

import json

import pytest

from phoenix_lab.samples import attempt_ends, divergence
from phoenix_trainer.core.layout import metrics_key
from phoenix_trainer.core.storage.file import LocalStorage

pytestmark = pytest.mark.unit


def run(tmp_path, name: str, attempts: dict[int, list[dict]]) -> LocalStorage:
    storage = LocalStorage(tmp_path / name)
    for attempt, records in attempts.items():
        lines = [json.dumps({"attempt": attempt, **r}) for r in records]
        storage.put_bytes(metrics_key(attempt), ("\n".join(lines) + "\n").encode())
    return storage


def steps(first: int, last: int, bump_from: int | None = None) -> list[dict]:
    return [{"event": "step", "step": s, "loss": 1.0 / s + (1e-7 if bump_from and s >= bump_from else 0)}
            for s in range(first, last + 1)]


def test_names_the_first_differing_step_its_attempt_and_where_that_attempt_started(tmp_path):
    ref = run(tmp_path, "ref", {1: [{"event": "start", "step": 0}, *steps(1, 30)]})
    job = run(tmp_path, "job", {
        1: [{"event": "start", "step": 0}, *steps(1, 12)],
        2: [{"event": "resume", "step": 10}, *steps(11, 30, bump_from=17),
            {"event": "recovered", "step": 16, "restoredStep": 15}],
    })
    text = divergence(job, ref)
    assert text.startswith("first differing loss at step 17: ") and "attempt 2, which started at step 10" in text
    assert "attempts started at {1: 0, 2: 10}" in text and "in-process recoveries [(2, 16, 15)]" in text


def test_says_so_when_every_logged_loss_matches(tmp_path):
    ref = run(tmp_path, "ref", {1: [{"event": "start", "step": 0}, *steps(1, 30)]})
    job = run(tmp_path, "job", {1: [{"event": "start", "step": 0}, *steps(1, 20)],
                                3: [{"event": "resume", "step": 20}, *steps(21, 30)]})
    assert divergence(job, ref).startswith("all 30 logged losses (steps 1-30) equal the reference's")
    # No checkpoints in either: the steps say so (a lost final save shows as two steps).
    assert divergence(job, ref).endswith(
        "newest valid checkpoint at step None, the reference's at step None")


def test_an_attempt_reached_the_checkpoint_a_later_one_resumed_from_even_if_its_log_lags(tmp_path):
    # Attempt 2 was SIGKILLed between committing step 40 and uploading that commit's record:
    # its own log ends at step 21, and attempt 3's resume record names it as step 40's writer.
    job = run(tmp_path, "job", {
        1: [{"event": "start", "step": 0}, *steps(1, 20), {"event": "checkpoint", "step": 20},
            {"event": "end", "step": 20}],
        2: [{"event": "resume", "step": 20, "checkpointAttempt": 1}, *steps(21, 21)],
        3: [{"event": "resume", "step": 40, "checkpointAttempt": 2}, *steps(41, 45)],
        4: [{"event": "resume", "step": 40}],  # a record from before the field: no claim
    })
    assert attempt_ends(job) == {1: 20, 2: 40, 3: 45}
