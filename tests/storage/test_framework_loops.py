"""Lightning and Hugging Face Trainer scripts keep Phoenix's guarantees: each example is
killed with SIGKILL and SIGTERM at seeded steps (mid-epoch and across epoch boundaries),
resumed through the operator's env contract against the local S3 server, and must end with
the uninterrupted run's weights, tensor for tensor, having seen exactly as many samples.

Both draw random crops and token dropout in two worker processes, and both resume with
Phoenix's loader (Lightning's PhoenixLoader; the Hugging Face Trainer iterates it after
``phoenix.restore(trainer)``), which seeds every batch's fetch from (seed, epoch, batch) and
skips consumed batches by index, so the weights are compared (what cannot be restored is
reported in the ResumeExact verdict, checked by tests/unit/trainer/test_integrations.py)."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from phoenix_trainer.checkpoint import load_checkpoint
from phoenix_trainer.core.contract import TerminationMessage
from phoenix_trainer.core.layout import latest_valid_checkpoint
from phoenix_trainer.core.storage import open_storage
from phoenix_trainer.testing import state_dicts_equal
from trainer_procs import first_checkpoint_landed, kill_and_resume

pytest.importorskip("lightning")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.storage, pytest.mark.slow]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS = 48  # 16 optimizer steps per epoch: 256 samples, batches of 8, accumulation 2


def final_checkpoint(uri: str) -> dict:
    storage = open_storage(uri)
    info = latest_valid_checkpoint(storage)
    assert info is not None and info.step == STEPS, info
    return load_checkpoint(storage, info)


# full for Transformers: make test resumes its Trainer exactly in tests/unit/trainer/test_transformers_resume.py
@pytest.mark.parametrize("script", ["train_lightning.py", pytest.param("train_transformers.py", marks=pytest.mark.full)])
def test_framework_killed_and_resumed_equals_uninterrupted(script, s3_server, s3_env, s3_bucket, tmp_path):
    seed = int(os.environ.get("PHOENIX_TEST_SEED", time.time_ns() % 10_000))
    print(f"kill schedule seed {seed} (set PHOENIX_TEST_SEED to replay)")
    rng = random.Random(seed)
    args = ["--steps", str(STEPS), "--log-every", "1", "--step-delay", "0.05", "--seed", str(seed % 5)]
    plan = [(signal.SIGKILL, rng.randint(8, 14)), (signal.SIGTERM, rng.randint(18, 30)),
            (signal.SIGKILL, rng.randint(33, 42))]
    name = script.removesuffix(".py")
    run_uri, ref_uri = f"{s3_bucket.uri}/{name}/train", f"{s3_bucket.uri}/{name}-ref/train"
    starts = kill_and_resume(s3_server, tmp_path, EXAMPLES / script, args, run_uri, ref_uri, plan,
                             ready=first_checkpoint_landed(run_uri, 5),
                             PHOENIX_CHECKPOINT_INTERVAL_STEPS="5")
    print(f"{script}: killed at {[at for _, at in plan]}, resumed at steps {starts}")
    assert all(s > 0 for s in starts)
    done = TerminationMessage.from_json((tmp_path / f"termination-{len(plan)}").read_text())
    assert done.resumeExact is True, done.resumeExactReason
    run, ref = final_checkpoint(run_uri), final_checkpoint(ref_uri)
    assert state_dicts_equal(run["model.pt"], ref["model.pt"]), \
        f"{script}: weights differ after resumes at {starts} (seed {seed})"
    seen = [c["trainer.json"]["progress"]["samplesSeen"] for c in (run, ref)]
    assert seen == [STEPS * 8 * 2] * 2, seen
