"""The fence end to end on the real S3 server: what the operator writes (phase_storage.write_fence)
is what the trainer's writer checks. Attempt 2, superseded by 3, publishes and prunes nothing."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from phoenix_operator.phase_storage import write_fence
from phoenix_operator.phoenixjob import JobSpec
from phoenix_trainer.core.errors import SupersededError
from phoenix_trainer.core.layout import checkpoint_steps
from phoenix_trainer.core.storage import Credentials, open_storage
from phoenix_trainer.core.writer import RetryPolicy, apply_retention, commit_checkpoint

pytestmark = pytest.mark.storage


@dataclass
class Prefix:
    """One phase prefix on the real S3 server, as the operator (``spec``, ``access``) and a
    trainer (``trainer`` storage, ``commit``) each reach it."""

    spec: JobSpec
    access: dict
    trainer: object
    shard: object

    def commit(self, step: int, attempt: int, uid: str = ""):
        return commit_checkpoint(self.trainer, step, {"model.pt": self.shard}, epoch=0,
                                 phase="train", config_fingerprint="f", attempt=attempt,
                                 uid=uid, retry=RetryPolicy(attempts=2, sleep=lambda s: None))


@pytest.fixture
def prefix(s3_bucket, tmp_path) -> Prefix:
    ep = s3_bucket.endpoint
    shard = tmp_path / "model.pt"
    shard.write_bytes(b"w" * 1000)
    return Prefix(
        spec=JobSpec.parse({"phases": [{"name": "train"}],
                            "checkpoint": {"uri": f"{s3_bucket.uri}/run"}}),
        access={"credentials": Credentials(endpoint_url=ep.url, access_key=ep.access_key,
                                           secret_key=ep.secret_key)},
        trainer=open_storage(f"{s3_bucket.uri}/run/train", Credentials(
            endpoint_url=ep.url, access_key=ep.access_key, secret_key=ep.secret_key)),
        shard=shard)


def test_operator_fence_stops_the_older_attempt(prefix, s3_bucket):
    spec, access, trainer, commit = prefix.spec, prefix.access, prefix.trainer, prefix.commit

    assert write_fence(spec, "train", 2, "j.train-2", "t0", **access) == \
        f"{s3_bucket.uri}/run/train/fence.json"
    for step in (10, 20, 30):
        commit(step, 2)
    write_fence(spec, "train", 3, "j.train-3", "t1", **access)  # attempt 3 starts
    with pytest.raises(SupersededError, match="superseded by attempt 3 \\(pod j.train-3"):
        commit(40, 2)
    with pytest.raises(SupersededError):
        apply_retention(trainer, keep=2, attempt=2)
    assert checkpoint_steps(trainer) == [10, 20, 30]
    assert commit(40, 3).valid and apply_retention(trainer, keep=2, attempt=3) == [10, 20]


def test_re_created_job_on_the_same_prefix(prefix):
    """Issue 22, item 1, on the real S3 server: job A (attempt 5) is deleted while its trainer
    still runs; job B is created with the same checkpoint.uri. The operator's listing shows
    A's fence, B starts above it, and from B's fence on A's trainer commits and deletes
    nothing, whatever its attempt number; A's stale handoff request is cleared."""
    from phoenix_operator.phase_storage import scan
    from phoenix_trainer.core import handshake
    from phoenix_trainer.core.handshake import Control, read_control

    spec, access, trainer, commit = prefix.spec, prefix.access, prefix.trainer, prefix.commit
    write_fence(spec, "train", 5, "a.train-5", "t0", uid="uid-a", job="ns/a", **access)
    commit(10, 5, "uid-a")
    handshake.write_control(trainer, Control(5, handoff_to=6, uid="uid-a"))
    listing = scan(spec, "train", **access)
    assert (listing.fence.uid, listing.fence.attempt, listing.fence.job) == ("uid-a", 5, "ns/a")
    # B (decide puts its first attempt above A's fence: 6) fences the prefix.
    write_fence(spec, "train", 6, "b.train-6", "t1", uid="uid-b", job="ns/b",
                clear_control=True, **access)
    assert read_control(trainer) is None
    with pytest.raises(SupersededError, match="uid-b"):
        commit(20, 7, "uid-a")  # even a higher number: A is not the fence's job
    with pytest.raises(SupersededError):
        apply_retention(trainer, keep=2, attempt=5, uid="uid-a")
    assert commit(20, 6, "uid-b").valid
    assert checkpoint_steps(trainer) == [10, 20]
