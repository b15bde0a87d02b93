"""The epoch/step loop: resume, in-process recovery, periodic async checkpoints, SIGTERM.

One shape: a plain loop over epochs and batches, with small callbacks at step and epoch
boundaries. Everything Phoenix-facing (env contract, restore, async saves, the stop, the
termination message) is a ``Session`` (session.py), the same API other loops use; this
module adds the loop, the data position and in-process recovery. Stopping is cooperative:
the SIGTERM handler only records that it fired; the loop notices at the next step boundary
and the session tries an emergency checkpoint if the grace period allows it, writes the
termination message and the run returns exit code 143.

A step is one optimizer step over ``accumulate_grad_batches`` micro-batches (fewer at the
end of an epoch); checkpoints and stops happen only between optimizer steps.

Bit-exact resume rests on four rules kept here:
- RNG states are restored at the step boundary they were captured at. At an epoch start
  that is *before* the epoch's iterator is built (a loader Phoenix does not own may draw
  from the global RNG then); mid-epoch it is *after* (in the uninterrupted run the iterator
  already existed).
- The data position is (epoch, micro-batches consumed in the epoch); ``loaders.py`` turns
  it back into the same batches with the same worker randomness, or says it cannot.
- Optimizer state is cloned before ``load_state_dict`` (optimizers alias what they load,
  which would let training mutate the in-memory "last good" snapshot).
- What cannot be restored exactly is reported, not just logged: the termination message,
  every checkpoint's manifest and the PhoenixJob's ``ResumeExact`` condition carry it.

Never do real work in the signal handler; never log credentials.
"""
from __future__ import annotations

import logging
import signal
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .checkpoint import Snapshot
from .core.contract import REASON_COMPLETED, REASON_PREEMPTED, TrainerEnv
from .core.errors import CheckpointError, RecoveryExhaustedError, StageError
from .core.layout import CheckpointInfo
from .core.storage import Storage
from .determinism import Exactness, capture_rng, kernel_exactness, restore_rng
from .loaders import adapt_loader
from .policies import (
    CheckpointPolicy,
    DataPolicy,
    RecoveryPolicy,
    ReportingPolicy,
    take_legacy_keywords,
)
from .session import RunResult, Session
from .tensors import clone_tree

__all__ = ["Trainer", "Callback", "RunResult", "CheckpointPolicy", "RecoveryPolicy", "DataPolicy",
           "ReportingPolicy"]

log = logging.getLogger("phoenix.trainer")


class Callback:
    """Hooks around the loop. Override what you need; the trainer passes itself."""

    def on_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", loss: torch.Tensor) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_checkpoint(self, trainer: "Trainer", info: CheckpointInfo) -> None: ...
    def on_end(self, trainer: "Trainer", result: "RunResult") -> None: ...


class Trainer:
    """Trains ``model`` with ``loss_fn(model, batch) -> loss``; see module docstring."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader: Iterable,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
        scheduler: Any = None, scaler: Any = None, grad_clip_norm: float | None = None,
        epochs: int | None = None, max_steps: int | None = None, config: dict | None = None,
        env: TrainerEnv | None = None, storage: Storage | None = None,
        callbacks: Sequence[Callback] = (), checkpoint: CheckpointPolicy | None = None,
        recovery: RecoveryPolicy | None = None, data: DataPolicy | None = None,
        reporting: ReportingPolicy | None = None, install_signal_handlers: bool = True,
        clock: Callable[[], float] = time.monotonic, **legacy: Any,
    ) -> None:
        p = take_legacy_keywords("Trainer", legacy, {"checkpoint": checkpoint, "recovery": recovery,
                                                     "data": data, "reporting": reporting})
        recovery, accumulate = p["recovery"], p["data"].accumulate_grad_batches
        if epochs is None and max_steps is None:
            raise ValueError("give epochs= or max_steps= (or both); otherwise training never ends")
        if accumulate < 1:
            raise ValueError(f"accumulate_grad_batches={accumulate}; use 1 or more")
        self.model, self.optimizer, self.loader, self.loss_fn = model, optimizer, train_loader, loss_fn
        self.scheduler, self.scaler, self.grad_clip_norm = scheduler, scaler, grad_clip_norm
        self.epochs, self.max_steps = epochs, max_steps
        self.accumulate = int(accumulate)
        self.data = adapt_loader(train_loader)
        self.batch_size = self.data.batch_size
        self.batches_per_epoch = self.data.batches_per_epoch  # micro-batches
        self.steps_per_epoch: int | None = (
            -(-self.batches_per_epoch // self.accumulate) if self.batches_per_epoch is not None else None)
        self.session = Session(
            config=config, env=env, storage=storage, checkpoint=p["checkpoint"], reporting=p["reporting"],
            install_signal_handlers=False, clock=clock, exactness=self.data.exactness)
        self.restart_method, self.max_retries = recovery.restart_method, recovery.max_retries
        self.retry_on = tuple(recovery.retry_on)
        self.snapshot_interval = recovery.snapshot_interval_steps or self.session.interval_steps or 50
        self.callbacks = list(callbacks)
        self.log_every = max(1, p["reporting"].log_every)
        self.install_signal_handlers, self.clock = install_signal_handlers, clock
        self.init_strict = p["checkpoint"].init_strict
        self.log = self.session.log

        # Position and bookkeeping (data.json and the session's trainer.json).
        self.step = 0  # optimizer steps
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches consumed in this epoch
        self.samples_seen = 0
        self.train_seconds = 0.0  # productive time only; restored from the checkpoint

        self._pending_rng: dict | None = None
        self._last_good: Snapshot | None = None
        self._epoch_start: Snapshot | None = None
        # A checkpoint whose copy overlaps the next step (checkpoint(), _settle()).
        self._overlap = p["checkpoint"].overlap_snapshot
        self._overlapping: Snapshot | None = None
        self._checkpoint_again = False  # an overlapped copy was written to: checkpoint now
        self._retries = 0
        self._failure_high_water = -1
        self._losses: deque[float] = deque(maxlen=max(10, self.log_every))
        self._window = (0.0, 0, 0)  # (train_seconds, step, samples) at last log line

    # ------------------------------------------------------------------ public API -------
    # What the session knows, under the names scripts and tests have used.
    env = property(lambda self: self.session.env)
    storage = property(lambda self: self.session.storage)
    fingerprint = property(lambda self: self.session.fingerprint)
    run_id = property(lambda self: self.session.run_id)
    attempt = property(lambda self: self.session.attempt)
    resumed_from = property(lambda self: self.session.resumed_from)
    checkpointer = property(lambda self: self.session.checkpointer)
    metrics = property(lambda self: self.session.metrics)
    exactness = property(lambda self: self.session.exactness)
    config = property(lambda self: self.session.config)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to stop at the next step boundary (what the SIGTERM handler does)."""
        self.session.request_stop(signum)

    @property
    def stop_requested(self) -> bool:
        return self.session.stop_requested

    @property
    def total_steps(self) -> int | None:
        candidates = []
        if self.max_steps is not None:
            candidates.append(self.max_steps)
        if self.epochs is not None and self.steps_per_epoch:
            candidates.append(self.epochs * self.steps_per_epoch)
        return min(candidates) if candidates else None

    def checkpoint(self, *, blocking: bool = False) -> Snapshot:
        """Snapshot now (the CPU copy) and upload in the background.

        Unless ``blocking`` (or ``CheckpointPolicy.overlap_snapshot`` is off), the copy of
        what only the optimizer's step writes - the parameters and the optimizer's state -
        may still run on the snapshot threads when this returns: the loop's next forward and
        backward run meanwhile, and the snapshot is settled and saved before that step's
        optimizer step (``_settle``)."""
        self._settle()
        defer = self._written_by_the_optimizer() if self._overlap and not blocking else None
        snap = self.session.snapshot(self.step, self.epoch, self._state(), self._progress(), defer)
        if snap.in_flight is not None:
            self._overlapping = snap
            return snap
        self._last_good = snap
        self.session.save(self.step, snap, blocking=blocking)
        return snap

    def _written_by_the_optimizer(self) -> Callable[[torch.Tensor], bool]:
        """The tensors only the optimizer's step writes: the parameters and its state."""
        ptrs = {p.data_ptr() for p in self.model.parameters() if p.numel()}
        for state in self.optimizer.state.values():
            ptrs.update(v.data_ptr() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.numel())
        return lambda t: t.numel() > 0 and t.data_ptr() in ptrs

    def _settle(self) -> None:
        """Save the checkpoint whose copy overlapped this step, once the copy is done; before
        the optimizer's step, a stop, a recovery or another snapshot. A copy whose sources
        were written meanwhile (a callback or the loss function editing parameters in place)
        is dropped, a checkpoint is taken at the next step boundary instead, and snapshots
        are copied whole from then on."""
        snap, self._overlapping = self._overlapping, None
        if snap is None:
            return
        if snap.settle():
            self._last_good = snap
            self.session.save(snap.step, snap)
            return
        self._overlap, self._checkpoint_again = False, True
        self.log.warning("the parameters or optimizer state of step %d were written in place while"
                         " its checkpoint copied them (by a callback or the loss function?): that"
                         " checkpoint is dropped, one is taken at the next step boundary, and"
                         " snapshots are copied whole from now on", snap.step)

    def fit(self) -> RunResult:
        if self.install_signal_handlers:
            self.session.install_signal_handler()
        try:
            self._setup()
            reason = self._loop()
            result = self._finish(reason)
        except BaseException as e:
            result = self.session.fail(e, self.step, epoch=self.epoch, train_seconds=self.train_seconds)
            for cb in self.callbacks:
                cb.on_end(self, result)
            raise
        finally:
            self.session.close()
        return result

    # ------------------------------------------------------------------ setup ------------
    def _setup(self) -> None:
        self.session.exactness = Exactness.combine(self.data.exactness, kernel_exactness(self.model))
        restored = self.session.restore()
        if restored is not None and restored.kind == "resume":
            self._apply(restored.state)
        elif restored is not None:
            self.model.load_state_dict(restored["model.pt"], strict=self.init_strict)
        self.session.after_commit.append(self._on_commit)
        self.session.started(self.step, self.epoch, trainSeconds=round(self.train_seconds, 3))
        self.log.info("data position: epoch %d, micro-batch %d", self.epoch, self.batch_in_epoch)
        # The state we start from is the first "last good state" for restart_method=reload.
        # Its RNG must be the restored one, which the loop has not applied yet.
        self._last_good = self._take_snapshot()
        if self._pending_rng is not None:
            self._last_good.tensors["rng.pt"] = self._pending_rng
        for cb in self.callbacks:
            cb.on_start(self)

    # ------------------------------------------------------------------ state ------------
    def _data_state(self) -> dict:
        return {"epoch": self.epoch, "batchInEpoch": self.batch_in_epoch, "batchSize": self.batch_size,
                "accumulateGradBatches": self.accumulate, "loader": self.data.state_dict()}

    def _state(self) -> dict[str, Any]:
        """Live references to everything a checkpoint holds (the session copies them)."""
        state: dict[str, Any] = {"model.pt": self.model.state_dict(),
                                 "optimizer.pt": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler.pt"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler.pt"] = self.scaler.state_dict()
        state["rng.pt"] = capture_rng()
        state["data.json"] = self._data_state()
        return state

    def _progress(self) -> dict[str, Any]:
        return {"samplesSeen": self.samples_seen, "trainSeconds": self.train_seconds}

    def _take_snapshot(self) -> Snapshot:
        return self.session.snapshot(self.step, self.epoch, self._state(), self._progress())

    def _apply(self, shards: dict[str, Any]) -> None:
        self.model.load_state_dict(shards["model.pt"])
        self.optimizer.load_state_dict(clone_tree(shards["optimizer.pt"]))
        if self.scheduler is not None and "scheduler.pt" in shards:
            self.scheduler.load_state_dict(clone_tree(shards["scheduler.pt"]))
        if self.scaler is not None and "scaler.pt" in shards:
            self.scaler.load_state_dict(clone_tree(shards["scaler.pt"]))
        self._pending_rng = shards["rng.pt"]
        data, tr = shards["data.json"], shards["trainer.json"]
        if data.get("batchSize") not in (None, self.batch_size):
            raise CheckpointError(f"checkpoint used batch size {data['batchSize']}, this run uses"
                                  f" {self.batch_size}; the data position would not line up")
        if int(data.get("accumulateGradBatches", 1)) != self.accumulate:
            raise CheckpointError(
                f"checkpoint used accumulate_grad_batches={data.get('accumulateGradBatches', 1)},"
                f" this run uses {self.accumulate}; its step count and data position would not line up")
        self.data.load_state_dict(data.get("loader"))
        progress = tr.get("progress") or tr  # before the session API these were top-level
        self.epoch, self.batch_in_epoch = int(data["epoch"]), int(data["batchInEpoch"])
        self.step, self.samples_seen = int(tr["step"]), int(progress["samplesSeen"])
        self.train_seconds = float(progress["trainSeconds"])

    def _apply_snapshot(self, snap: Snapshot) -> None:
        self._apply({**snap.tensors, **snap.documents})

    # ------------------------------------------------------------------ the loop ---------
    def _done(self) -> bool:
        return ((self.max_steps is not None and self.step >= self.max_steps)
                or (self.epochs is not None and self.epoch >= self.epochs))

    def _loop(self) -> str:
        while True:
            try:
                reason = self._run_epochs()
                self._settle()  # a stop right after a checkpoint: it is saved, then the stop's
                return reason
            except Exception as e:  # noqa: BLE001 - classified right below
                if isinstance(e, StageError) and e.step is None:
                    e.step = self.step + 1
                if not self._retryable(e):
                    raise
                self._settle()  # the step that failed wrote nothing the copy reads
                self._recover(e)

    def _retryable(self, e: BaseException) -> bool:
        cause = e.cause if isinstance(e, StageError) else e
        return isinstance(cause, self.retry_on) or isinstance(e, self.retry_on)

    def _recover(self, e: BaseException) -> None:
        failing = self.step + 1
        if isinstance(e, StageError):
            e.step = failing
        self._retries += 1
        self._failure_high_water = max(self._failure_high_water, failing)
        if self._retries > self.max_retries:
            raise RecoveryExhaustedError(
                f"gave up after {self.max_retries} in-process retries (restart_method="
                f"{self.restart_method}); last error at step {failing}: {e}. Raise max_retries or"
                f" fix the failing stage") from e
        snap = self._epoch_start if self.restart_method == "reinit_epoch" and self._epoch_start else self._last_good
        assert snap is not None
        self.log.warning("step %d failed (%s); restart_method=%s: restoring step %d (epoch %d),"
                         " retry %d/%d", failing, e, self.restart_method, snap.step, snap.epoch,
                         self._retries, self.max_retries)
        self._apply_snapshot(snap)
        if self.metrics:
            self.metrics.emit("recovered", step=failing, restoredStep=snap.step, error=str(e)[:500],
                              retry=self._retries, restartMethod=self.restart_method)

    def _run_epochs(self) -> str:
        while not self._done():
            if self.session.should_stop(self.step):
                return REASON_PREEMPTED
            skip = self.batch_in_epoch
            if skip == 0 and self._pending_rng is not None:
                restore_rng(self._pending_rng)  # before the iterator: it may draw from the global RNG
                self._pending_rng = None
            if skip == 0 and self.restart_method == "reinit_epoch":
                self._epoch_start = self._take_snapshot()
            it = self.data.epoch_iterator(self.epoch, skip)
            if self._pending_rng is not None:
                restore_rng(self._pending_rng)  # mid-epoch: the iterator existed already
                self._pending_rng = None
            while True:
                if self.session.should_stop(self.step):
                    return REASON_PREEMPTED
                t0 = time.perf_counter()
                batches = self._next_micro_batches(it)
                if not batches:
                    break
                loss = self._train_step(batches)
                self.train_seconds += time.perf_counter() - t0
                self.step += 1
                self.batch_in_epoch += len(batches)
                self.samples_seen += sum(_batch_len(b, self.batch_size) for b in batches)
                if self.step > self._failure_high_water:
                    self._retries = 0
                rolled = self.batches_per_epoch is not None and self.batch_in_epoch >= self.batches_per_epoch
                if rolled:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._after_step(loss)
                if rolled:
                    self._after_epoch(self.epoch - 1)
                if rolled or self._done():
                    break
            if self.batch_in_epoch and self.batches_per_epoch is None and not self._done() and not self.session.should_stop(self.step):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0  # iterable without len: ran dry
                self._after_epoch(self.epoch - 1)
        return REASON_COMPLETED

    def _next_micro_batches(self, it: Iterator[Any]) -> list[Any]:
        """The micro-batches of the next optimizer step (fewer at the end of an epoch)."""
        n = self.accumulate
        if self.batches_per_epoch is not None:
            n = min(n, self.batches_per_epoch - self.batch_in_epoch)
        batches = []
        for _ in range(n):
            batch = next(it, _END)
            if batch is _END:
                break
            batches.append(batch)
        return batches

    def _train_step(self, batches: list[Any]) -> torch.Tensor:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(batches)
        total: torch.Tensor | None = None
        for batch in batches:
            loss = self.loss_fn(self.model, batch)
            part = loss / n if n > 1 else loss  # the mean over the window, as one big batch
            (self.scaler.scale(part) if self.scaler is not None else part).backward()
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        self._settle()  # before the optimizer's step writes what a checkpoint may be copying
        if self.scaler is not None:
            if self.grad_clip_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return total / n if n > 1 else total

    def _after_step(self, loss: torch.Tensor) -> None:
        if self.step % self.log_every == 0 or self._done():
            self._log_progress(float(loss))
        if (self.session.should_checkpoint(self.step) or self._checkpoint_again) and not self._done():
            self._checkpoint_again = False
            self.checkpoint()
        elif self.restart_method == "reload" and self.step % self.snapshot_interval == 0:
            self._last_good = self._take_snapshot()
        for cb in self.callbacks:
            cb.on_step_end(self, loss)

    def _after_epoch(self, epoch: int) -> None:
        # A StagedModule (stages.py) logs its per-stage forward times; looked up by name, so
        # the loop does not import the module that builds on it.
        log_timings = getattr(self.model, "log_timings", None)
        if callable(log_timings):
            log_timings(prefix=f"[{self.env.log_context}] epoch {epoch}: ")
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch)

    def _log_progress(self, loss: float) -> None:
        self._losses.append(loss)
        t_prev, s_prev, n_prev = self._window
        dt = max(1e-9, self.train_seconds - t_prev)
        steps_per_sec = (self.step - s_prev) / dt
        samples_per_sec = (self.samples_seen - n_prev) / dt
        self._window = (self.train_seconds, self.step, self.samples_seen)
        total = self.total_steps
        eta = (total - self.step) / steps_per_sec if total and steps_per_sec > 0 else None
        lr = self.optimizer.param_groups[0].get("lr")
        avg = sum(self._losses) / len(self._losses)
        self.log.info("step %d epoch %d loss %.4f (avg %.4f) lr %.3g %.1f steps/s %.0f samples/s eta %s",
                      self.step, self.epoch, loss, avg, lr or 0.0, steps_per_sec, samples_per_sec,
                      f"{eta:.0f}s" if eta is not None else "?")
        self.session.emit("step", step=self.step, epoch=self.epoch, loss=loss, lossAvg=avg, lr=lr,
                          stepsPerSec=round(steps_per_sec, 3), samplesPerSec=round(samples_per_sec, 1),
                          trainSeconds=round(self.train_seconds, 3),
                          etaSeconds=round(eta, 1) if eta is not None else None, totalSteps=total)

    def _on_commit(self, info: CheckpointInfo) -> None:  # runs on the upload thread
        for cb in self.callbacks:
            cb.on_checkpoint(self, info)

    # ------------------------------------------------------------------ the end ----------
    def _finish(self, reason: str) -> RunResult:
        result = self.session.finish(reason, self.step, epoch=self.epoch, state=self._state,
                                     progress=self._progress(), train_seconds=self.train_seconds)
        for cb in self.callbacks:
            cb.on_end(self, result)
        return result


_END = object()


def _batch_len(batch: Any, default: int | None) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return int(v.shape[0])
    return default or 1
