"""Storage fencing: once the operator has started attempt N+1 (its fence says so), attempt N -
say a trainer still running on a partitioned node - can neither publish nor delete a
checkpoint. Torch-free: the writer commits files that are already serialized."""
from __future__ import annotations

import pytest

from phoenix_trainer.core.errors import CorruptCheckpointError, SupersededError
from phoenix_trainer.core.handshake import FENCE_NAME, Fence, read_fence, write_control, write_fence
from phoenix_trainer.core.layout import (
    MANIFEST_NAME, checkpoint_steps, list_checkpoints, step_dir_name,
)
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.core.writer import RetryPolicy, apply_retention, commit_checkpoint

pytestmark = pytest.mark.unit
NO_WAIT = RetryPolicy(attempts=2, sleep=lambda s: None)


def fence(storage, attempt: int) -> None:
    write_fence(storage, Fence(attempt, f"j.train-{attempt}", "t"))


def commit(storage, step: int, attempt: int | None, tmp_path):
    shard = tmp_path / f"model-{step}.pt"
    shard.write_bytes(b"weights %d" % step)
    return commit_checkpoint(storage, step, {"model.pt": shard}, epoch=0, phase="train",
                             config_fingerprint="f", attempt=attempt, retry=NO_WAIT)


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "ckpt")


def test_fence_round_trip_and_absent(storage):
    assert read_fence(storage) is None
    fence(storage, 3)
    assert read_fence(storage) == Fence(3, "j.train-3", "t")
    storage.put_bytes(FENCE_NAME, b"{not json")
    with pytest.raises(CorruptCheckpointError, match="fence.json"):
        read_fence(storage)


@pytest.mark.parametrize("fenced,attempt", [(None, 2), (2, 2), (1, 2), (5, None)])
def test_current_attempt_or_no_fence_commits(storage, tmp_path, fenced, attempt):
    if fenced is not None:
        fence(storage, fenced)
    assert commit(storage, 10, attempt, tmp_path).valid
    assert [c.valid for c in list_checkpoints(storage)] == [True]


def test_superseded_attempt_writes_nothing(storage, tmp_path):
    fence(storage, 3)
    with pytest.raises(SupersededError, match="attempt 2 is superseded by attempt 3"):
        commit(storage, 10, 2, tmp_path)
    assert checkpoint_steps(storage) == []  # not even a shard: the successor may own step 10


class FenceMovesOn:
    """Storage that lets the operator write the fence for attempt 3 in the middle of an
    upload: right after the shard (``when='shard'``) or right after the manifest."""

    def __init__(self, inner, when: str) -> None:
        self.inner, self.when = inner, when

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put_file(self, key, path):
        self.inner.put_file(key, path)
        if self.when == "shard":
            fence(self.inner, 3)

    def put_bytes(self, key, data):
        self.inner.put_bytes(key, data)
        if self.when == "manifest" and key.endswith(MANIFEST_NAME):
            fence(self.inner, 3)


@pytest.mark.parametrize("when", ["shard", "manifest"])
def test_fence_moving_mid_commit_leaves_no_manifest(storage, tmp_path, when):
    with pytest.raises(SupersededError):
        commit(FenceMovesOn(storage, when), 10, 2, tmp_path)
    assert storage.size(f"{step_dir_name(10)}/{MANIFEST_NAME}") is None
    assert [c.valid for c in list_checkpoints(storage)] == [False]


def test_superseded_attempt_deletes_nothing_the_current_one_does(storage, tmp_path):
    for step in (10, 20, 30, 40):
        commit(storage, step, 2, tmp_path)
    fence(storage, 3)
    with pytest.raises(SupersededError, match="apply retention"):
        apply_retention(storage, keep=2, attempt=2)
    assert checkpoint_steps(storage) == [10, 20, 30, 40]
    assert apply_retention(storage, keep=2, attempt=3) == [10, 20]


class FenceMovesOnDelete(FenceMovesOn):
    def delete(self, key):
        self.inner.delete(key)
        fence(self.inner, 3)


def test_retention_stops_at_the_first_step_after_the_fence_moved(storage, tmp_path):
    for step in (10, 20, 30, 40):
        commit(storage, step, 2, tmp_path)
    with pytest.raises(SupersededError, match="delete checkpoint step 20"):
        apply_retention(FenceMovesOnDelete(storage, "never"), keep=2, attempt=2)
    assert checkpoint_steps(storage) == [20, 30, 40]


# --- issue 22, item 2: the checkpoint the current fence names is never taken back ----------
class OperatorPicksIt(FenceMovesOn):
    """Between the old writer's manifest and its post-check, the operator lists, picks this
    very step and writes the fence for attempt 3 naming it (``resumeFrom``)."""

    def put_bytes(self, key, data):
        self.inner.put_bytes(key, data)
        if key.endswith(MANIFEST_NAME):
            write_fence(self.inner, Fence(
                3, "j.train-3", "t", resume_from=self.inner.uri_for(step_dir_name(10))))


def test_take_back_never_deletes_the_step_the_promotion_fence_names(storage, tmp_path):
    """The old attempt still raises (it commits nothing more), but the manifest the new
    attempt was told to resume from stays: deleting it made the new attempt fall back."""
    with pytest.raises(SupersededError):
        commit(OperatorPicksIt(storage, "never"), 10, 2, tmp_path)
    assert [(c.step, c.valid) for c in list_checkpoints(storage)] == [(10, True)]


def test_take_back_still_removes_a_step_the_fence_does_not_name(storage, tmp_path):
    with pytest.raises(SupersededError):
        commit(FenceMovesOn(storage, "manifest"), 10, 2, tmp_path)
    assert [c.valid for c in list_checkpoints(storage)] == [False]


# --- issue 22, item 1: the fence names the job, not only a number a re-created job resets ---
def foreign_fence(storage, attempt: int, uid: str, job: str = "ns/b") -> None:
    write_fence(storage, Fence(attempt, f"b.train-{attempt}", "t", uid=uid, job=job))


def commit_as(storage, step: int, attempt: int, uid: str, tmp_path):
    shard = tmp_path / f"model-{step}.pt"
    shard.write_bytes(b"weights %d" % step)
    return commit_checkpoint(storage, step, {"model.pt": shard}, epoch=0, phase="train",
                             config_fingerprint="f", attempt=attempt, uid=uid, retry=NO_WAIT)


def test_fence_names_the_job_uid_and_round_trips(storage):
    foreign_fence(storage, 2, "uid-b")
    assert read_fence(storage) == Fence(2, "b.train-2", "t", uid="uid-b", job="ns/b")


def test_a_re_created_jobs_fence_supersedes_the_old_jobs_higher_attempt(storage, tmp_path):
    """Job A (attempt 5, still in its grace period) was deleted; job B on the same prefix
    fenced its attempt 1. Keyed by attempt numbers alone, A's attempt 5 went on committing."""
    foreign_fence(storage, 1, "uid-b")
    with pytest.raises(SupersededError, match="uid-b"):
        commit_as(storage, 10, 5, "uid-a", tmp_path)
    with pytest.raises(SupersededError):
        apply_retention(storage, keep=2, attempt=5, uid="uid-a")
    assert commit_as(storage, 10, 1, "uid-b", tmp_path).valid


def test_a_fence_without_uid_is_judged_by_attempt_alone(storage, tmp_path):
    fence(storage, 3)  # written by an operator from before the uid
    assert commit_as(storage, 10, 3, "uid-a", tmp_path).valid


def test_control_of_another_job_is_not_obeyed(storage):
    from phoenix_trainer.control import ControlPoller
    from phoenix_trainer.core.handshake import Control

    write_control(storage, Control(1, checkpoint_now="n1", handoff_to=2, handoff_pod="a.train-2",
                                   uid="uid-a"))
    heard = []
    poller = ControlPoller(storage, 1, 1.0, uid="uid-b", on_checkpoint=heard.append,
                           on_handoff=lambda a, p: heard.append((a, p)))
    poller.poll_once()
    assert heard == []  # job A's stale handoff request: job B's attempt 1 keeps training
    write_control(storage, Control(1, checkpoint_now="n2", uid="uid-b"))
    poller.poll_once()
    assert heard == ["n2"]
