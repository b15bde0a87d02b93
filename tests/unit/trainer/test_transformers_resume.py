"""The Hugging Face Trainer resumes bit-exactly with a random collator and worker processes.

A tiny BERT learns masked-LM with ``DataCollatorForLanguageModeling(mlm=True)`` (masking
drawn from the global RNGs), 2 DataLoader workers and gradient accumulation 2. Per seed, a
run is stopped twice at seeded steps - a real SIGTERM (emergency checkpoint, exit 143) and a
crash between checkpoints (the process's work since the last checkpoint is lost, as with
SIGKILL) - and resumed from the newest checkpoint; it must end with the uninterrupted run's
weights, tensor for tensor. In-process (local files), so that three seeds cost seconds; the
same example with real signals and S3 is tests/storage/test_framework_loops.py. What cannot
be exact (a collator with a generator of its own) is reported so, whatever the script claims.
"""
from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from phoenix_trainer.core.contract import TerminationMessage, TrainerEnv
from phoenix_trainer.core.layout import latest_valid_checkpoint
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.policies import CheckpointPolicy
from phoenix_trainer.session import Session
from phoenix_trainer.testing import state_dicts_equal

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.unit, pytest.mark.slow]

STEPS, INTERVAL = 24, 3  # 48 samples, batches of 4, accumulation 2: 6 optimizer steps per epoch
VOCAB = ["[PAD]", "[UNK]", "[MASK]"] + [f"t{i}" for i in range(29)]


class Sequences(Dataset):
    def __init__(self, n: int = 48, length: int = 12) -> None:
        self.x = torch.randint(3, len(VOCAB), (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i]}


def tokenizer():
    from tokenizers import Tokenizer, models

    word_level = models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(word_level), pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")


class Crash(BaseException):
    """Not an Exception: nothing on its way out of the Trainer catches it."""


class Interrupt(transformers.TrainerCallback):
    """SIGTERM to this process, or a crash, after optimizer step ``at``."""

    def __init__(self, at: int, how: str) -> None:
        self.at, self.how = at, how

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.at:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise Crash()


def run(root: Path, attempt: int, interrupt: tuple[int, str] | None = None, *, seed: int = 0,
        collator_seed: int | None = None, **callback_kw) -> tuple[dict, Session]:
    """One attempt (a process's life) of the training script; its model's weights and session."""
    from phoenix_trainer.integrations.transformers import PhoenixCallback

    env = TrainerEnv(termination_log=str(root / f"termination-{attempt}"), attempt=attempt, grace_seconds=30)
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16))
    args = transformers.TrainingArguments(
        output_dir=str(root / "hf"), max_steps=STEPS, seed=seed, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-2, dataloader_num_workers=2, use_cpu=True,
        report_to="none", disable_tqdm=True, logging_strategy="no", save_strategy="no")
    collator = transformers.DataCollatorForLanguageModeling(tokenizer(), mlm=True, seed=collator_seed)
    with Session(config={"seed": seed}, env=env, storage=LocalStorage(root / "train"),
                 checkpoint=CheckpointPolicy(interval_steps=INTERVAL)) as session:
        phoenix = PhoenixCallback(session, **callback_kw)
        trainer = transformers.Trainer(model, args, train_dataset=Sequences(), data_collator=collator,
                                       callbacks=[*([Interrupt(*interrupt)] if interrupt else []), phoenix])
        try:
            trainer.train(resume_from_checkpoint=phoenix.restore(trainer))
        except Crash:
            pass  # the with-block's end lets uploads already under way land, as a kill would not
    return model.state_dict(), session


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_masked_lm_with_workers_and_accumulation_resumes_exactly(tmp_path, seed):
    rng = random.Random(seed)
    term_at = rng.randint(2, 11)  # seeds 1, 2, 3: SIGTERM at 4, 2, 5; crash at 10, 8, 18
    crash_at = rng.randint(term_at + INTERVAL + 1, STEPS - 1)  # resumed at 9, 6 (an epoch end), 15
    reference, ref_session = run(tmp_path / "ref", 0, seed=seed)
    assert ref_session.exactness.exact, ref_session.exactness.reason
    _, first = run(tmp_path / "run", 0, (term_at, "sigterm"), seed=seed)
    assert first.result is not None and first.result.exit_code == 143
    _, second = run(tmp_path / "run", 1, (crash_at, "crash"), seed=seed)
    assert second.resumed_from is not None and second.resumed_from.step == term_at
    final, third = run(tmp_path / "run", 2, seed=seed)
    resumed_at = third.resumed_from.step
    assert resumed_at == (crash_at - 1) // INTERVAL * INTERVAL  # the newest one before the crash
    assert third.result.exit_code == 0 and third.result.exactness.exact
    msg = TerminationMessage.from_json((tmp_path / "run" / "termination-2").read_text())
    assert msg.resumeExact is True
    assert state_dicts_equal(final, reference), \
        f"seed {seed}: SIGTERM at {term_at}, crash at {crash_at}, resumed at {resumed_at}: weights differ"


def test_a_collator_with_its_own_generator_is_reported_not_exact_whatever_the_flag(tmp_path):
    """DataCollatorForLanguageModeling(seed=...) keeps a generator per worker that a resume
    restarts: the termination message and the manifest say so, even with the old flag."""
    with pytest.warns(DeprecationWarning):
        _, session = run(tmp_path, 0, collator_seed=7, deterministic_data=True)
    msg = TerminationMessage.from_json((tmp_path / "termination-0").read_text())
    assert msg.resumeExact is False and "seed=" in msg.resumeExactReason, msg
    manifest = latest_valid_checkpoint(LocalStorage(tmp_path / "train")).manifest
    assert manifest.extra["resumeExact"] is False and "seed=" in manifest.extra["resumeExactReason"]
