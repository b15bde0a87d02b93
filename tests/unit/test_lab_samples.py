"""phoenix_lab.samples.divergence: a failed weights check says where the run parted from its
reference (the first step whose logged loss differs, the attempt and where it started)."""
from __future__ import annotations

import json

import pytest

from phoenix_lab.samples import divergence
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
