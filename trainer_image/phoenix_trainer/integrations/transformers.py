"""Phoenix for the Hugging Face ``transformers.Trainer``: a ``TrainerCallback``.

The ``Trainer`` keeps its loop; Phoenix takes over where checkpoints go, what a SIGTERM
does and how the train loader resumes. The lines a script adds
(``examples/train_transformers.py``, docs/snippets/transformers_trainer.py)::

    with Session(config=cfg) as session:
        phoenix = PhoenixCallback(session)
        trainer = Trainer(model, TrainingArguments(..., save_strategy="no"), train_dataset=ds,
                          data_collator=collator, callbacks=[phoenix])
        trainer.train(resume_from_checkpoint=phoenix.restore(trainer))
    raise SystemExit(phoenix.exit_code)

- ``restore(trainer)`` asks the session for the newest valid checkpoint (``PHOENIX_RESUME_FROM``,
  else discovery, with fallback over damaged ones) and lays it out as a local checkpoint
  directory in the Trainer's own format (weights, ``optimizer.pt``, ``scheduler.pt``,
  ``rng_state.pth``, ``trainer_state.json``), whose path goes to
  ``train(resume_from_checkpoint=...)``: the Trainer then restores as it always does. None
  starts fresh.
- Given the trainer, it also makes the Trainer iterate a Phoenix loader (``TrainerLoader``):
  the Trainer's own train loader (sampler, collator, workers) adapted with
  ``ResumableLoader``, reached through the Trainer's two documented extension points
  (``get_train_dataloader``, ``get_resumed_dataloader``) on this one instance. Each batch
  is fetched and collated with the global RNGs seeded from (root seed, epoch, batch index)
  and a resume skips the consumed batches as lists of indices, so random transforms, a
  masked-LM collator and worker processes repeat the uninterrupted run exactly.
- ``on_step_end`` (after every optimizer step, where the Trainer itself would save) asks
  ``session.should_checkpoint``; the state goes to ``session.save`` from memory (only the
  CPU copy blocks; the Trainer's own synchronous save to disk is not used:
  ``save_strategy="no"``). ``extra_state`` adds entries of the script's own.
- SIGTERM (the session's handler; the Trainer installs none): at the next step boundary
  ``session.finish("preempted")`` saves the emergency checkpoint if the grace period
  allows and writes the termination message; the callback stops the Trainer
  (``should_training_stop``, no evaluation or save of its own) and ``exit_code`` is 143.

The ``ResumeExact`` verdict is Phoenix's own finding, never the script's claim: exact when
the loader is Phoenix's, its sampler orders by (seed, epoch) and its collator is one whose
randomness Phoenix seeds (``collator_exactness``); otherwise False with the reason (the
trainer not passed to ``restore``, a collator Phoenix does not know, one with its own seeded
generator, ``ignore_data_skip=True``). The GradScaler of fp16 training is the accelerator's,
out of a callback's reach: its loss scale restarts. Single process. Imports transformers;
nothing in ``phoenix_trainer`` imports this module.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import tempfile
import warnings
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers import data as hf_data
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.utils import WEIGHTS_NAME

from ..core.contract import REASON_COMPLETED, REASON_PREEMPTED
from ..determinism import EXACT, Exactness, capture_rng, kernel_exactness, restore_rng
from ..loaders import ResumableLoader
from ..session import Session
from ._session_hook import SessionHook

log = logging.getLogger("phoenix.trainer")

MODEL_SHARD, OPTIMIZER_SHARD, SCHEDULER_SHARD = "model.pt", "optimizer.pt", "scheduler.pt"
RNG_SHARD, STATE_DOC, LOADER_DOC = "rng.pt", "trainer_state.json", "loader.json"
OWN_SHARDS = frozenset({MODEL_SHARD, OPTIMIZER_SHARD, SCHEDULER_SHARD, RNG_SHARD, STATE_DOC, LOADER_DOC})
HF_RNG_FILE = "rng_state.pth"  # Trainer._load_rng_state reads this name (single process)
NOT_ADAPTED = Exactness(False, (
    "the Hugging Face Trainer iterates its own train loader (pass the trainer:"
    " phoenix.restore(trainer)): it restores the global RNGs only after fetching the first"
    " batches of a resumed epoch and never the DataLoader worker seeds, so random transforms"
    " or a random collator differ after a mid-epoch resume"))
SKIPS_NO_DATA = Exactness(False, "TrainingArguments(ignore_data_skip=True): a resumed epoch"
                                 " starts from its first batch")

# Collators whose output is a function of the samples alone, and those that draw only from
# the global RNGs (torch, random, numpy), which Phoenix's loader seeds for every batch.
_DETERMINISTIC_COLLATORS = (
    hf_data.DefaultDataCollator, hf_data.DataCollatorWithPadding,
    hf_data.DataCollatorForTokenClassification, hf_data.DataCollatorForSeq2Seq,
    hf_data.DataCollatorForMultipleChoice, hf_data.DataCollatorWithFlattening,
)
_DETERMINISTIC_FUNCTIONS = (hf_data.default_data_collator, torch.utils.data.default_collate)
_GLOBAL_RNG_COLLATORS = (hf_data.DataCollatorForLanguageModeling,
                         hf_data.DataCollatorForPermutationLanguageModeling)


def collator_exactness(collator: Any) -> Exactness:
    """Whether Phoenix can vouch that ``collator`` repeats itself after a resume.

    Known deterministic collators and those drawing from the global RNGs (seeded per batch
    by the loader) are exact; a masked-LM collator with ``seed=`` keeps a generator per
    worker process that a resume restarts; anything else is unknown, hence not vouched for."""
    inner = getattr(collator, "data_collator", collator)  # the Trainer's RemoveColumnsCollator
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    if inner is None or any(inner is f for f in _DETERMINISTIC_FUNCTIONS):
        return EXACT
    if type(inner) in _DETERMINISTIC_COLLATORS:
        return EXACT
    # transformers' own subclasses (whole-word masking) draw the same way; a subclass of the
    # script's own may draw from anything, so it is not one Phoenix knows.
    if isinstance(inner, _GLOBAL_RNG_COLLATORS) and type(inner).__module__.startswith("transformers."):
        if getattr(inner, "seed", None) is not None:
            return Exactness(False, (
                f"{name}(seed=...) keeps a generator of its own in each worker process, which a"
                " resume restarts: leave seed unset (Phoenix seeds the global RNGs per batch)"))
        return EXACT
    return Exactness(False, (
        f"data collator {name} is not one Phoenix knows: it cannot tell whether it draws random"
        " numbers other than from the global RNGs it seeds per batch"))


class TrainerLoader:
    """What the Trainer iterates instead of its own train loader: one epoch at a time
    (``set_epoch``), from a position (``skipping``), through a ``ResumableLoader``."""

    def __init__(self, adapted: ResumableLoader, skip: int = 0) -> None:
        self.adapted, self.skip, self.epoch = adapted, skip, 0
        self.dataset = adapted.original.dataset  # Trainer.num_examples reads it
        self.batch_size = adapted.batch_size

    def __len__(self) -> int:
        assert self.adapted.batches_per_epoch is not None
        return self.adapted.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skipping(self, batches: int) -> "TrainerLoader":
        """The same loader starting ``batches`` into its epoch (the Trainer's resumed epoch)."""
        return TrainerLoader(self.adapted, int(batches))

    def __iter__(self) -> Iterator[Any]:
        return self.adapted.epoch_iterator(self.epoch, self.skip)


class PhoenixCallback(SessionHook, TrainerCallback):
    """The Trainer's state onto a ``Session``; see the module docstring.

    ``extra_state``: a function returning entries of the script's own (an EMA, a curriculum:
    ``{"ema.pt": ema.state_dict()}``) saved with every checkpoint; a resume gives them back
    in ``phoenix.restored``."""

    def __init__(self, session: Session, *, extra_state: Callable[[], Mapping[str, Any]] | None = None,
                 deterministic_data: bool | None = None) -> None:
        super().__init__(session)
        if deterministic_data is not None:
            warnings.warn("PhoenixCallback(deterministic_data=...) is ignored: Phoenix checks the"
                          " loader and collator itself (pass the trainer to restore())",
                          DeprecationWarning, stacklevel=2)
        self.extra_state = extra_state
        self.resume_dir: str | None = None
        self.loader: TrainerLoader | None = None
        self.data_exactness = NOT_ADAPTED

    # -------------------------------------------------------------- before train ---------
    def restore(self, trainer: Any = None) -> str | None:
        """Find and load the checkpoint to resume (``session.restore``); the value for
        ``trainer.train(resume_from_checkpoint=...)``: None to start fresh. Given the
        ``trainer``, also make it iterate Phoenix's loader (and add this callback if absent)."""
        if trainer is not None:
            self._attach(trainer)
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

    def _attach(self, trainer: Any) -> None:
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        if not hasattr(trainer, "get_resumed_dataloader"):
            # Older Trainers skip a resumed epoch's batches with accelerate's
            # skip_first_batches inline: no place to hand it Phoenix's position.
            self.data_exactness = Exactness(False, (
                "this transformers version's Trainer has no get_resumed_dataloader(), so Phoenix"
                " cannot give it a loader of its own (upgrade transformers); " + NOT_ADAPTED.reason))
            return
        own_loader, own_resumed = trainer.get_train_dataloader, trainer.get_resumed_dataloader

        def get_train_dataloader() -> Any:
            return self._adapt(own_loader())

        def get_resumed_dataloader(dataloader: Any, num_batches: int) -> Any:
            if isinstance(dataloader, TrainerLoader):
                return dataloader.skipping(num_batches)
            return own_resumed(dataloader, num_batches)

        trainer.get_train_dataloader = get_train_dataloader
        trainer.get_resumed_dataloader = get_resumed_dataloader

    def _adapt(self, loader: Any) -> Any:
        """The Trainer's train loader as a ``TrainerLoader``, or itself with the reason why not."""
        if (not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset)
                or loader.batch_sampler is None):
            self.data_exactness = Exactness(False, (
                f"the train loader ({type(loader).__name__} over {type(loader.dataset).__name__})"
                " is not a map-style DataLoader: the Trainer re-reads the consumed batches"))
            return loader
        adapted = ResumableLoader(loader)
        if self.restored is not None and self.restored.kind == "resume":
            adapted.load_state_dict(self.restored.get(LOADER_DOC))
        self.data_exactness = Exactness.combine(adapted.exactness, collator_exactness(loader.collate_fn))
        self.loader = TrainerLoader(adapted)
        return self.loader

    # -------------------------------------------------------------- hooks ----------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        if self.restored is not None and self.restored.kind == "init":  # a previous phase's weights
            model.load_state_dict(self.restored[MODEL_SHARD])
        self.session.exactness = Exactness.combine(
            self.data_exactness, SKIPS_NO_DATA if args.ignore_data_skip else EXACT,
            kernel_exactness(model))
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
    def _state(self, args: TrainingArguments, state: TrainerState, *, model: torch.nn.Module,
               optimizer: Any, lr_scheduler: Any, **_: Any) -> dict[str, Any]:
        extra = dict(self.extra_state()) if self.extra_state is not None else {}
        clash = OWN_SHARDS & set(extra)
        if clash:
            raise ValueError(f"extra_state entries {sorted(clash)} would replace the callback's own")
        own = {MODEL_SHARD: model.state_dict(), OPTIMIZER_SHARD: optimizer.state_dict(),
               SCHEDULER_SHARD: lr_scheduler.state_dict(), RNG_SHARD: capture_rng(),
               STATE_DOC: dataclasses.asdict(state)}
        if self.loader is not None:
            own[LOADER_DOC] = self.loader.adapted.state_dict()
        return {**extra, **own}

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
