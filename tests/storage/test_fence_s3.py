"""The fence end to end on the real S3 server: what the operator writes (facts.write_fence)
is what the trainer's writer checks. Attempt 2, superseded by 3, publishes and prunes nothing."""
from __future__ import annotations

import pytest

from phoenix_operator.facts import write_fence
from phoenix_operator.model import JobSpec
from phoenix_trainer.errors import SupersededError
from phoenix_trainer.layout import checkpoint_steps
from phoenix_trainer.storage import open_storage
from phoenix_trainer.writer import RetryPolicy, apply_retention, commit_checkpoint

pytestmark = pytest.mark.storage


def test_operator_fence_stops_the_older_attempt(s3_bucket, tmp_path):
    ep = s3_bucket.endpoint
    access = {"access_key": ep.access_key, "secret_key": ep.secret_key, "endpoint": ep.url}
    spec = JobSpec.parse({"phases": [{"name": "train"}],
                          "checkpoint": {"uri": f"{s3_bucket.uri}/run"}})
    trainer = open_storage(f"{s3_bucket.uri}/run/train", endpoint_url=ep.url,
                           access_key=ep.access_key, secret_key=ep.secret_key)
    shard = tmp_path / "model.pt"
    shard.write_bytes(b"w" * 1000)

    def commit(step, attempt):
        return commit_checkpoint(trainer, step, {"model.pt": shard}, epoch=0, phase="train",
                                 config_fingerprint="f", attempt=attempt,
                                 retry=RetryPolicy(attempts=2, sleep=lambda s: None))

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
