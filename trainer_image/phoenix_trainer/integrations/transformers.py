"""Phoenix for the Hugging Face ``transformers.Trainer``: a ``TrainerCallback``.

The ``Trainer`` keeps its loop; Phoenix takes over where checkpoints go and what a SIGTERM
does. The lines a script adds (``examples/train_transformers.py``)::

    with Session(config=cfg) as session:
        phoenix = PhoenixCallback(session)
        trainer = Trainer(model, TrainingArguments(..., save_strategy="no"), train_dataset=ds,
                          callbacks=[phoenix])
        trainer.train(resume_from_checkpoint=phoenix.restore())
    raise SystemExit(phoenix.exit_code)

- ``restore()`` asks the session for the newest valid checkpoint (``PHOENIX_RESUME_FROM``,
  else discovery, with fallback over damaged ones) and lays it out as a local checkpoint
  directory in the Trainer's own format (weights, ``optimizer.pt``, ``scheduler.pt``,
  ``rng_state.pth``, ``trainer_state.json``), whose path goes to
  ``train(resume_from_checkpoint=...)``: the Trainer then restores and skips the consumed
  batches as it always does. None starts fresh.
- ``on_step_end`` (after every optimizer step, where the Trainer itself would save) asks
  ``session.should_checkpoint``; the state goes to ``session.save`` from memory (only the
  CPU copy blocks; the Trainer's own synchronous save to disk is not used:
  ``save_strategy="no"``).
- SIGTERM (the session's handler; the Trainer installs none): at the next step boundary
  ``session.finish("preempted")`` saves the emergency checkpoint if the grace period
  allows and writes the termination message; the callback stops the Trainer
  (``should_training_stop``, no evaluation or save of its own) and ``exit_code`` is 143.

What a resume cannot restore exactly (reported in the ``ResumeExact`` verdict unless the
script declares ``deterministic_data=True``): the Trainer restores the global RNGs only
after fetching the first batches of a resumed epoch, and never the DataLoader workers'
seeds, so random transforms or a random collator (masked-LM masking) draw differently
after a mid-epoch resume. The GradScaler of fp16 training is the accelerator's, out of a
callback's reach: its loss scale restarts. Single process. Imports transformers; nothing
in ``phoenix_trainer`` imports this module.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.utils import WEIGHTS_NAME

from ..core.contract import REASON_COMPLETED, REASON_PREEMPTED
from ..determinism import Exactness, capture_rng, kernel_exactness, restore_rng
from ..session import Session
from ._session_hook import SessionHook

log = logging.getLogger("phoenix.trainer")

MODEL_SHARD, OPTIMIZER_SHARD, SCHEDULER_SHARD = "model.pt", "optimizer.pt", "scheduler.pt"
RNG_SHARD, STATE_DOC = "rng.pt", "trainer_state.json"
HF_RNG_FILE = "rng_state.pth"  # Trainer._load_rng_state reads this name (single process)
RANDOM_DATA = Exactness(False, (
    "the Hugging Face Trainer restores the global RNGs only after fetching the first batches"
    " of a resumed epoch and does not restore DataLoader worker seeds: random transforms or a"
    " random collator differ after a mid-epoch resume (PhoenixCallback(deterministic_data=True)"
    " declares that the dataset and collator draw no random numbers)"))
SKIPS_NO_DATA = Exactness(False, "TrainingArguments(ignore_data_skip=True): a resumed epoch"
                                 " starts from its first batch")


class PhoenixCallback(SessionHook, TrainerCallback):
    """The Trainer's state onto a ``Session``; see the module docstring."""

    def __init__(self, session: Session, *, deterministic_data: bool = False) -> None:
        super().__init__(session)
        self.deterministic_data = deterministic_data
        self.resume_dir: str | None = None

    # -------------------------------------------------------------- before train ---------
    def restore(self) -> str | None:
        """Find and load the checkpoint to resume (``session.restore``); the value for
        ``trainer.train(resume_from_checkpoint=...)``: None to start fresh."""
        resume = self._restore()
        if resume is None:
            return None
        parent = tempfile.mkdtemp(prefix="phoenix-resume-")
        d = self.resume_dir = os.path.join(parent, f"checkpoint-{resume.step}")
        os.makedirs(d)
        torch.save(resume[MODEL_SHARD], os.path.join(d, WEIGHTS_NAME))
        torch.save(resume[OPTIMIZER_SHARD], os.path.join(d, OPTIMIZER_NAME))
        torch.save(resume[SCHEDULER_SHARD], os.path.join(d, SCHEDULER_NAME))
        torch.save(_hf_rng_state(resume[RNG_SHARD]), os.path.join(d, HF_RNG_FILE))
        TrainerState(**resume[STATE_DOC]).save_to_json(os.path.join(d, TRAINER_STATE_NAME))
        return d

    # -------------------------------------------------------------- hooks ----------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        if self.restored is not None and self.restored.kind == "init":  # a previous phase's weights
            model.load_state_dict(self.restored[MODEL_SHARD])
        self.session.exactness = Exactness.combine(
            Exactness(True) if self.deterministic_data else RANDOM_DATA,
            SKIPS_NO_DATA if args.ignore_data_skip else Exactness(True), kernel_exactness(model))
        self.session.started(state.global_step, int(state.epoch or 0),
                             samplesSeen=self._samples(args, state))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        self._drop_resume_dir()  # the Trainer has read everything by the first step's end
        step = state.global_step
        if self.session.stop_requested:
            self.session.finish(REASON_PREEMPTED, step, epoch=int(state.epoch or 0),
                                state=lambda: self._state(args, state, **kwargs),
                                progress=self._progress(args, state))
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False
        elif self.session.should_checkpoint(step):
            self.session.save(step, self._state(args, state, **kwargs), epoch=int(state.epoch or 0),
                              progress=self._progress(args, state))
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._drop_resume_dir()
        if self.session.result is None:
            self.session.finish(REASON_COMPLETED, state.global_step, epoch=int(state.epoch or 0),
                                state=lambda: self._state(args, state, **kwargs),
                                progress=self._progress(args, state))

    # -------------------------------------------------------------- helpers --------------
    @staticmethod
    def _state(args: TrainingArguments, state: TrainerState, *, model: torch.nn.Module,
               optimizer: Any, lr_scheduler: Any, **_: Any) -> dict[str, Any]:
        return {MODEL_SHARD: model.state_dict(), OPTIMIZER_SHARD: optimizer.state_dict(),
                SCHEDULER_SHARD: lr_scheduler.state_dict(), RNG_SHARD: capture_rng(),
                STATE_DOC: dataclasses.asdict(state)}

    @staticmethod
    def _samples(args: TrainingArguments, state: TrainerState) -> int:
        # Every optimizer step consumes train_batch_size x accumulation samples, except the
        # last of an epoch whose batch count does not divide (none with drop_last and N | len).
        return state.global_step * args.train_batch_size * args.gradient_accumulation_steps

    def _progress(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
        return {"samplesSeen": self._samples(args, state), "hfEpoch": state.epoch}

    def _drop_resume_dir(self) -> None:
        if self.resume_dir is not None:
            shutil.rmtree(os.path.dirname(self.resume_dir), ignore_errors=True)
            self.resume_dir = None


def _hf_rng_state(saved: dict[str, Any]) -> dict[str, Any]:
    """Phoenix's ``rng.pt`` in the form ``Trainer._load_rng_state`` reads."""
    current = capture_rng()
    restore_rng(saved)
    try:
        out: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                               "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            out["cuda"] = torch.cuda.random.get_rng_state_all()
        return out
    finally:
        restore_rng(current)
