"""Loops Phoenix does not own keep its guarantees: each example is killed with SIGKILL and
SIGTERM at seeded steps, resumed through the operator's env contract against the local S3
server, and must end with the uninterrupted run's weights, tensor for tensor."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from phoenix_trainer.checkpoint import load_checkpoint
from phoenix_trainer.core.layout import latest_valid_checkpoint
from phoenix_trainer.core.storage import open_storage
from phoenix_trainer.testing import state_dicts_equal
from trainer_procs import kill_and_resume

pytestmark = [pytest.mark.storage, pytest.mark.slow]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def weights_at(uri: str, step: int, shard: str = "model.pt"):
    storage = open_storage(uri)
    info = latest_valid_checkpoint(storage)
    assert info is not None and info.step == step, info
    return load_checkpoint(storage, info)[shard]


def test_custom_loop_killed_and_resumed_equals_uninterrupted(s3_server, s3_env, s3_bucket, tmp_path):
    seed = int(os.environ.get("PHOENIX_TEST_SEED", time.time_ns() % 10_000))
    print(f"kill schedule seed {seed} (set PHOENIX_TEST_SEED to replay)")
    rng = random.Random(seed)
    steps = 60  # 8 batches per epoch, 2 shuffling workers with random noise per sample
    args = ["--steps", str(steps), "--samples", "128", "--batch-size", "16", "--log-every", "1",
            "--step-delay", "0.02", "--seed", str(seed % 7)]
    plan = [(signal.SIGKILL, rng.randint(12, 20)), (signal.SIGTERM, rng.randint(26, 36)),
            (signal.SIGKILL, rng.randint(44, 52))]
    run_uri, ref_uri = f"{s3_bucket.uri}/custom/train", f"{s3_bucket.uri}/custom-ref/train"
    starts = kill_and_resume(s3_server, tmp_path, EXAMPLES / "train_custom_loop.py", args, run_uri,
                             ref_uri, plan, PHOENIX_CHECKPOINT_INTERVAL_STEPS="5")
    print(f"resumed at steps {starts}")
    assert all(s > 0 for s in starts)
    assert state_dicts_equal(weights_at(run_uri, steps), weights_at(ref_uri, steps)), \
        f"weights differ after resumes at {starts} (seed {seed})"
