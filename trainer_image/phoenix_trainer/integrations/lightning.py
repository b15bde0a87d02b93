"""Phoenix for PyTorch Lightning: a callback, a checkpoint plugin and a loader wrapper.

Lightning keeps its loop; Phoenix takes over where its checkpoints go and what a SIGTERM
does. The lines a script adds (``examples/train_lightning.py``)::

    with Session(config=cfg) as session:
        phoenix = PhoenixCallback(session)
        trainer = L.Trainer(max_steps=n, callbacks=[phoenix], enable_checkpointing=False)
        trainer.fit(model, PhoenixLoader(train_loader), ckpt_path=phoenix.restore())
    raise SystemExit(phoenix.exit_code)

- ``PhoenixCallback.restore()`` asks the session for the newest valid checkpoint
  (``PHOENIX_RESUME_FROM``, else discovery, with fallback over damaged ones) and returns
  the ``ckpt_path`` for ``trainer.fit``: the checkpoint's URI, which the callback's
  ``CheckpointIO`` (installed in ``setup``) answers from memory. Lightning then restores
  model, optimizers, schedulers, precision plugin, loops and callbacks as it always does.
- At every optimizer step (``on_train_batch_end`` once ``global_step`` moved) it asks
  ``session.should_checkpoint``; the checkpoint is Lightning's own dictionary, taken
  through ``trainer.save_checkpoint`` and handed to ``session.save`` (only the CPU copy
  blocks): ``model.pt`` (the module's ``state_dict``, where other phases look for
  weights), ``lightning.pt`` (everything else Lightning saves) and ``rng.pt`` (Lightning
  does not save the global RNGs; the callback restores them before the first batch).
- SIGTERM (the session's handler, alone during fit: Lightning's own would raise
  ``SIGTERMException`` after the next micro-batch, between accumulated ones, and exit 0):
  at the next optimizer step boundary ``session.finish("preempted")`` saves the emergency
  checkpoint if the grace period allows and writes the termination message, and the
  callback raises ``SystemExit(143)`` (Lightning tears down as for any exception). A
  SIGTERM during validation is answered at the first step after it.
- ``PhoenixLoader`` wraps the train loader with ``adapt_loader``; its position is
  Lightning-stateful (``state_dict``/``load_state_dict``), so a mid-epoch resume
  continues with the next batch, bit-exactly for a map-style ``DataLoader``. A loader
  Lightning gets unwrapped restarts its epoch on resume and is reported as not exact.

Single process (one device per pod). Imports lightning; nothing in ``phoenix_trainer``
imports this module.
"""
from __future__ import annotations

import logging
import signal
import threading
from collections import OrderedDict
from typing import Any, Iterator, Mapping

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.utilities.data import extract_batch_size

from ..core.contract import REASON_COMPLETED, REASON_PREEMPTED
from ..determinism import Exactness, capture_rng, kernel_exactness, restore_rng
from ..loaders import adapt_loader
from ..session import Session
from ._session_hook import SessionHook

log = logging.getLogger("phoenix.trainer")

MODEL_SHARD = "model.pt"
LIGHTNING_SHARD = "lightning.pt"
RNG_SHARD = "rng.pt"
# trainer.save_checkpoint() to this path hands the dictionary to the callback, not to disk.
_CAPTURE = "phoenix://capture"
UNWRAPPED_LOADER = Exactness(False, (
    "the train loader is not wrapped in PhoenixLoader: Lightning restarts a resumed epoch"
    " from its first batch"))


class PhoenixLoader:
    """A train loader whose position Lightning saves and Phoenix restores exactly.

    Lightning prefetches a batch, so the loader cannot tell the consumed position itself;
    ``PhoenixCallback`` tells it at every step boundary (``at_step_boundary``)."""

    def __init__(self, loader: Any) -> None:
        self.adapted = adapt_loader(loader)
        self.exactness = self.adapted.exactness
        self.epoch, self.batch = 0, 0  # where the next iterator starts

    def __len__(self) -> int:
        if self.adapted.batches_per_epoch is None:
            raise TypeError(f"{type(self.adapted.loader).__name__} has no length")
        return self.adapted.batches_per_epoch

    def at_step_boundary(self, epoch: int, batches_done: int) -> None:
        self.epoch, self.batch = int(epoch), int(batches_done)

    def __iter__(self) -> Iterator[Any]:
        n = self.adapted.batches_per_epoch
        if n is not None and self.batch >= n:  # saved after the epoch's last batch
            self.epoch, self.batch = self.epoch + 1, 0
        epoch = self.epoch
        yield from self.adapted.epoch_iterator(epoch, self.batch)
        self.epoch, self.batch = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "loader": self.adapted.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.at_step_boundary(state["epoch"], state["batch"])
        self.adapted.load_state_dict(state.get("loader"))


class _PhoenixCheckpointIO(CheckpointIO):
    """Lightning's checkpoint dictionaries to and from the callback; other paths (a user's
    ``ModelCheckpoint``) go to the plugin that was there before."""

    def __init__(self, owner: "PhoenixCallback", inner: CheckpointIO) -> None:
        self.owner, self.inner = owner, inner
        self.captured: dict[str, Any] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if str(path) == _CAPTURE:
            self.captured = checkpoint
        else:
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        restored = self.owner.restored
        if restored is not None and str(path) == restored.info.uri:
            return {**restored[LIGHTNING_SHARD], "state_dict": restored[MODEL_SHARD]}
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class PhoenixCallback(SessionHook, pl.Callback):
    """Lightning's state onto a ``Session``; see the module docstring."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.samples_seen = 0
        self._rng: dict[str, Any] | None = None  # applied before the first batch after a resume
        self._io: _PhoenixCheckpointIO | None = None
        self._last_step: int | None = None

    # -------------------------------------------------------------- before fit -----------
    def restore(self) -> str | None:
        """Find and load the checkpoint to resume (``session.restore``); the value for
        ``trainer.fit(ckpt_path=...)``: None to start fresh."""
        resume = self._restore()
        if resume is None:
            return None
        self._rng = resume.get(RNG_SHARD)
        self.samples_seen = int(resume.progress.get("samplesSeen", 0))
        return resume.info.uri

    # -------------------------------------------------------------- hooks ----------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, _PhoenixCheckpointIO):
            self._io = _PhoenixCheckpointIO(self, strategy.checkpoint_io)
            strategy.checkpoint_io = self._io
        if self.restored is not None and self.restored.kind == "init":  # a previous phase's weights
            pl_module.load_state_dict(self.restored[MODEL_SHARD])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = self._loaders(trainer)
        self.session.exactness = Exactness.combine(
            *(loader.exactness for loader in loaders), *(() if loaders else (UNWRAPPED_LOADER,)),
            kernel_exactness(pl_module))
        self._last_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            # Lightning chains a handler of its own in front of the session's; its reaction
            # (SIGTERMException after the next micro-batch, even between accumulated ones,
            # then exit 0) would beat the step boundary. During fit only the session hears
            # SIGTERM; Lightning's teardown puts the session's handler back.
            signal.signal(signal.SIGTERM, lambda signum, frame: self.session.request_stop(signum))
        self.session.started(trainer.global_step, trainer.current_epoch, samplesSeen=self.samples_seen)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._rng is not None:
            restore_rng(self._rng)
            self._rng = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.samples_seen += extract_batch_size(batch)
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: not a step boundary
            return
        self._last_step = step
        for loader in self._loaders(trainer):
            loader.at_step_boundary(trainer.current_epoch, batch_idx + 1)
        if self.session.stop_requested:
            self._stop(trainer)
        if self.session.should_checkpoint(step):
            self.session.save(step, self._state(trainer), epoch=trainer.current_epoch,
                              progress=self._progress())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session.result is None:
            self.session.finish(REASON_COMPLETED, trainer.global_step, epoch=trainer.current_epoch,
                                state=lambda: self._state(trainer), progress=self._progress())

    # -------------------------------------------------------------- helpers --------------
    def _stop(self, trainer: pl.Trainer) -> None:
        result = self.session.finish(REASON_PREEMPTED, trainer.global_step, epoch=trainer.current_epoch,
                                     state=lambda: self._state(trainer), progress=self._progress())
        raise SystemExit(result.exit_code)

    def _state(self, trainer: pl.Trainer) -> dict[str, Any]:
        assert self._io is not None, "PhoenixCallback.setup() did not run"
        trainer.save_checkpoint(_CAPTURE, weights_only=False)
        ckpt, self._io.captured = _plain(self._io.captured), None
        if ckpt is None:
            raise RuntimeError("Lightning did not hand over a checkpoint (not global rank 0?)")
        model = ckpt.pop("state_dict")
        return {MODEL_SHARD: model, LIGHTNING_SHARD: ckpt, RNG_SHARD: capture_rng()}

    def _progress(self) -> dict[str, Any]:
        return {"samplesSeen": self.samples_seen}

    @staticmethod
    def _loaders(trainer: pl.Trainer) -> list[PhoenixLoader]:
        found, todo = [], [trainer.train_dataloader]
        while todo:
            item = todo.pop()
            if isinstance(item, PhoenixLoader):
                found.append(item)
            elif isinstance(item, Mapping):
                todo.extend(item.values())
            elif isinstance(item, (list, tuple)):
                todo.extend(item)
        return found


def _plain(obj: Any) -> Any:
    """Dict subclasses Lightning puts in a checkpoint (``AttributeDict`` hyperparameters) as
    plain dicts: Phoenix loads shards with ``torch.load(weights_only=True)``."""
    if isinstance(obj, dict):
        kind = type(obj) if type(obj) in (dict, OrderedDict) else dict
        return kind((k, _plain(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj
