"""The script people really write resumes bit-exactly: ``examples/train_transformer.py`` with
two DataLoader workers shuffling and applying random transforms (token dropout, random crop),
gradient accumulation 2, dropout, AdamW, warmup + cosine and clipping, killed with SIGKILL
and SIGTERM at seeded steps and resumed through the operator's env contract against the
local S3 server. Resumes land mid-epoch and on epoch boundaries; the final weights must be
``torch.equal`` to the uninterrupted run's, for a plain ``shuffle=True`` loader and for
``ResumableShuffleSampler``, three seeds each."""
from __future__ import annotations

import os

import random
import signal
from pathlib import Path

import pytest

from phoenix_trainer.checkpoint import load_checkpoint
from phoenix_trainer.core.layout import latest_valid_checkpoint
from phoenix_trainer.core.storage import open_storage
from phoenix_trainer.testing import state_dicts_equal
from trainer_procs import kill_and_resume

pytestmark = [pytest.mark.storage, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_transformer.py"
STEPS = 30
STEPS_PER_EPOCH = 6  # 88 samples / batch 8 = 11 micro-batches; 2 per step, the 6th step short
ARGS = ["--steps", str(STEPS), "--samples", "88", "--batch-size", "8", "--accumulate", "2",
        "--workers", "2", "--log-every", "1", "--step-delay", "0.02", "--checkpoint-every", "4"]


def final_weights(uri: str):
    storage = open_storage(uri)
    info = latest_valid_checkpoint(storage)
    assert info is not None and info.step == STEPS
    assert info.manifest.extra.get("resumeExact") is True, info.manifest.extra
    return load_checkpoint(storage, info)["model.pt"]


# `make test` runs one seed per loader (the seed moves the kills); every pair runs with the
# rest of the slow storage runs (`make test-storage-all`, PHOENIX_S3_SLOW_ON_ALL=1): about
# 24 s each.
ALL = os.environ.get("PHOENIX_S3_SLOW_ON_ALL", "") in ("1", "true")
CASES = [(loader, seed) for loader in ("shuffle", "sampler") for seed in (1, 2, 3)
         if ALL or (loader, seed) in (("shuffle", 1), ("sampler", 2))]


@pytest.mark.parametrize("loader,seed", CASES)
def test_killed_transformer_run_equals_uninterrupted(s3_server, s3_env, s3_bucket, tmp_path, loader, seed):
    args = [*ARGS, "--loader", loader, "--seed", str(seed)]
    ref_uri, run_uri = f"{s3_bucket.uri}/ref-{loader}-{seed}/train", f"{s3_bucket.uri}/run-{loader}-{seed}/train"
    rng = random.Random(seed)
    # (signal, step at which to send it): a SIGKILL in epoch 1 (resume from the checkpoint at
    # step 8 or 4, mid-epoch), a SIGTERM timed so the stop lands on the end of epoch 1 (resume
    # at an epoch boundary from the emergency checkpoint), a SIGKILL in epoch 2 (resume from
    # step 16, mid-epoch). Periodic uploads are asynchronous: kills wait two steps past them.
    plan = [(signal.SIGKILL, rng.randint(10, 11)), (signal.SIGTERM, 2 * STEPS_PER_EPOCH - 1),
            (signal.SIGKILL, rng.randint(18, 19))]
    resumed_at = kill_and_resume(s3_server, tmp_path, SCRIPT, args, run_uri, ref_uri, plan)
    print(f"resumed at steps {resumed_at} ({STEPS_PER_EPOCH} steps per epoch)")
    assert all(s > 0 for s in resumed_at), "a resume started from scratch: checkpoints too slow?"
    assert any(s % STEPS_PER_EPOCH for s in resumed_at), "no resume landed mid-epoch"
    assert state_dicts_equal(final_weights(run_uri), final_weights(ref_uri)), \
        f"weights differ after resumes at {resumed_at} (loader {loader}, seed {seed})"
