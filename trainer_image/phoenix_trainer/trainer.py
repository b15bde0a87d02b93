"""The epoch/step loop: resume, in-process recovery, periodic async checkpoints, SIGTERM.

One shape: a plain loop over epochs and batches, with small callbacks at step and epoch
boundaries. Stopping is cooperative: the SIGTERM handler only records that it fired; the
loop notices at the next step boundary, tries an emergency checkpoint if the grace period
allows it, writes the termination message and returns exit code 143.

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
import os
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .checkpoint import AsyncCheckpointer, Snapshot, load_checkpoint
from .contract import (
    EXIT_COMPLETED, EXIT_FAILED, EXIT_PREEMPTED, REASON_COMPLETED, REASON_FAILED,
    REASON_PREEMPTED, TerminationMessage, TrainerEnv,
)
from .errors import (
    CheckpointError, ConfigMismatchError, CorruptCheckpointError, RecoveryExhaustedError,
    StageError, TransientError,
)
from .layout import CheckpointInfo, config_fingerprint, split_checkpoint_uri
from .loaders import adapt_loader
from .metrics import MetricsLog, next_attempt
from .stages import RESTART_METHODS, StagedModule
from .state import Exactness, capture_rng, clone_tree, kernel_exactness, restore_rng, tree_nbytes
from .storage import Storage, latest_valid_checkpoint, open_storage, verify_checkpoint
from .writer import RetryPolicy

log = logging.getLogger("phoenix.trainer")

# Time kept back from the grace period for writing the termination message and exiting.
_EXIT_RESERVE_SECONDS = 1.0


class Callback:
    """Hooks around the loop. Override what you need; the trainer passes itself."""

    def on_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", loss: torch.Tensor) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_checkpoint(self, trainer: "Trainer", info: CheckpointInfo) -> None: ...
    def on_end(self, trainer: "Trainer", result: "RunResult") -> None: ...


@dataclass
class RunResult:
    reason: str
    step: int
    epoch: int
    checkpoint: str | None
    emergency_save_completed: bool
    message: str
    exit_code: int
    train_seconds: float
    exactness: Exactness | None = None

    def termination_message(self) -> TerminationMessage:
        ex = self.exactness
        return TerminationMessage(reason=self.reason, step=self.step, checkpoint=self.checkpoint,
                                  emergencySaveCompleted=self.emergency_save_completed,
                                  message=self.message,
                                  resumeExact=ex.exact if ex is not None else None,
                                  resumeExactReason=ex.reason if ex is not None else "")


class _Ctx(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['ctx']}] {msg}", kwargs


class Trainer:
    """Trains ``model`` with ``loss_fn(model, batch) -> loss``; see module docstring."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader: Iterable,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
        scheduler: Any = None, scaler: Any = None, grad_clip_norm: float | None = None,
        epochs: int | None = None, max_steps: int | None = None, config: dict | None = None,
        env: TrainerEnv | None = None, storage: Storage | None = None,
        checkpoint_interval_steps: int | None = None,
        checkpoint_interval_seconds: float | None = None,
        restart_method: str = "reload", max_retries: int = 3,
        retry_on: Sequence[type[BaseException]] = (TransientError,),
        snapshot_interval_steps: int | None = None, callbacks: Sequence[Callback] = (),
        log_every: int = 50, metrics_interval_seconds: float = 30.0, max_in_flight: int = 1,
        retry_policy: RetryPolicy | None = None, install_signal_handlers: bool = True,
        clock: Callable[[], float] = time.monotonic, init_strict: bool = True,
        emergency_checkpoint: bool = True, accumulate_grad_batches: int = 1,
    ) -> None:
        if epochs is None and max_steps is None:
            raise ValueError("give epochs= or max_steps= (or both); otherwise training never ends")
        if restart_method not in RESTART_METHODS:
            raise ValueError(f"restart_method={restart_method!r}; use one of {RESTART_METHODS}")
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches={accumulate_grad_batches}; use 1 or more")
        self.model, self.optimizer, self.loader, self.loss_fn = model, optimizer, train_loader, loss_fn
        self.scheduler, self.scaler, self.grad_clip_norm = scheduler, scaler, grad_clip_norm
        self.epochs, self.max_steps = epochs, max_steps
        self.config = dict(config or {})
        # Off only to measure what the SIGTERM emergency checkpoint is worth (benchmarks).
        self.emergency_checkpoint = emergency_checkpoint
        self.fingerprint = config_fingerprint(self.config)
        self.env = env or TrainerEnv.from_env()
        self.storage = storage
        if self.storage is None and self.env.checkpoint_uri:
            self.storage = open_storage(self.env.checkpoint_uri)
        elif self.storage is None and self.env.resume_from:
            # No prefix of our own: keep checkpointing where the resume target lives.
            self.storage = open_storage(split_checkpoint_uri(self.env.resume_from)[0])
        self.interval_steps = checkpoint_interval_steps or self.env.checkpoint_interval_steps
        self.interval_seconds = checkpoint_interval_seconds or self.env.checkpoint_interval_seconds
        self.restart_method, self.max_retries = restart_method, max_retries
        self.retry_on = tuple(retry_on)
        self.snapshot_interval = snapshot_interval_steps or self.interval_steps or 50
        self.callbacks = list(callbacks)
        self.log_every, self.metrics_interval = max(1, log_every), metrics_interval_seconds
        self.max_in_flight, self.retry_policy = max_in_flight, retry_policy
        self.install_signal_handlers, self.clock, self.init_strict = install_signal_handlers, clock, init_strict
        self.log = _Ctx(log, {"ctx": self.env.log_context})

        self.accumulate = int(accumulate_grad_batches)
        self.data = adapt_loader(train_loader)
        self.batch_size = self.data.batch_size
        self.batches_per_epoch = self.data.batches_per_epoch  # micro-batches
        self.steps_per_epoch: int | None = (
            -(-self.batches_per_epoch // self.accumulate) if self.batches_per_epoch is not None else None)
        self.exactness = self.data.exactness  # kernels are checked once the model is placed

        # Position and bookkeeping (all of it goes into trainer.json / data.json).
        self.step = 0  # optimizer steps
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches consumed in this epoch
        self.samples_seen = 0
        self.train_seconds = 0.0  # productive time only; restored from the checkpoint
        self.run_id = uuid.uuid4().hex[:12]
        self.attempt = 0
        self.resumed_from: CheckpointInfo | None = None
        self.checkpointer: AsyncCheckpointer | None = None
        self.metrics: MetricsLog | None = None

        self._stop_signal: int | None = None
        self._stop_time: float | None = None
        self._pending_rng: dict | None = None
        self._last_good: Snapshot | None = None
        self._epoch_start: Snapshot | None = None
        self._retries = 0
        self._failure_high_water = -1
        self._last_ckpt_time = 0.0
        self._last_metrics_upload = 0.0
        self._losses: deque[float] = deque(maxlen=max(10, self.log_every))
        self._window = (0.0, 0, 0)  # (train_seconds, step, samples) at last log line

    # ------------------------------------------------------------------ public API -------
    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to stop at the next step boundary (what the SIGTERM handler does)."""
        if self._stop_signal is None:
            self._stop_time = self.clock()
            self._stop_signal = signum

    @property
    def stop_requested(self) -> bool:
        return self._stop_signal is not None

    @property
    def total_steps(self) -> int | None:
        candidates = []
        if self.max_steps is not None:
            candidates.append(self.max_steps)
        if self.epochs is not None and self.steps_per_epoch:
            candidates.append(self.epochs * self.steps_per_epoch)
        return min(candidates) if candidates else None

    def checkpoint(self, *, blocking: bool = False) -> Snapshot:
        """Snapshot now (blocking, CPU copy) and upload in the background."""
        snap = self._take_snapshot()
        self._last_good = snap
        self._last_ckpt_time = self.clock()
        if self.checkpointer is not None:
            fut = self.checkpointer.save(snap, blocking=blocking)
            if blocking:
                fut.result()
        return snap

    def fit(self) -> RunResult:
        previous = self._install_signals()
        try:
            self._setup()
            reason = self._loop()
            result = self._finish(reason)
        except BaseException as e:
            result = self._fail(e)
            raise
        finally:
            self._restore_signals(previous)
            if self.checkpointer is not None:
                # After a preemption we already spent what the grace period allowed.
                self.checkpointer.close(timeout=0 if self.stop_requested else None)
        return result

    # ------------------------------------------------------------------ setup ------------
    def _install_signals(self):
        if not self.install_signal_handlers or threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):  # only a flag: never do real work in a signal handler
            self.request_stop(signum)

        return signal.signal(signal.SIGTERM, handler)

    def _restore_signals(self, previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    def _setup(self) -> None:
        self.exactness = Exactness.combine(self.data.exactness, kernel_exactness(self.model))
        if not self.exactness.exact:
            self.log.warning("a resume of this run will not be bit-exact: %s", self.exactness.reason)
        if self.storage is not None:
            self.attempt = self.env.attempt if self.env.attempt is not None else next_attempt(self.storage)
        else:
            self.attempt = self.env.attempt or 0
        self._restore()
        if self.storage is not None:
            self.checkpointer = AsyncCheckpointer(
                self.storage, phase=self.env.phase, config_fingerprint=self.fingerprint,
                keep=self.env.checkpoint_keep, run_id=self.run_id, attempt=self.attempt,
                max_in_flight=self.max_in_flight, retry=self.retry_policy,
                protect=[self.resumed_from.step] if self.resumed_from else [])
        self.metrics = MetricsLog(self.storage, self.attempt, {
            "runId": self.run_id, "attempt": self.attempt, "phase": self.env.phase})
        if self.checkpointer is not None:
            self.checkpointer.after_commit.append(self._on_commit)
        self.metrics.emit("resume" if self.resumed_from else "start", step=self.step, epoch=self.epoch,
                          checkpoint=self.resumed_from.uri if self.resumed_from else None,
                          configFingerprint=self.fingerprint, trainSeconds=round(self.train_seconds, 3),
                          resumeExact=self.exactness.exact, resumeExactReason=self.exactness.reason)
        # The pid shows whether the trainer is its container's PID 1 (it must be, or a shell
        # in front of it swallows the kubelet's SIGTERM).
        self.log.info("%s run %s attempt %d at step %d (epoch %d, batch %d), config %s, pid %d",
                      "resuming" if self.resumed_from else "starting", self.run_id, self.attempt,
                      self.step, self.epoch, self.batch_in_epoch, self.fingerprint, os.getpid())
        self._last_ckpt_time = self._last_metrics_upload = self.clock()
        # The state we start from is the first "last good state" for restart_method=reload.
        # Its RNG must be the restored one, which the loop has not applied yet.
        self._last_good = self._take_snapshot()
        if self._pending_rng is not None:
            self._last_good.tensors["rng.pt"] = self._pending_rng
        for cb in self.callbacks:
            cb.on_start(self)

    def _restore(self) -> None:
        if self.storage is None:
            self._init_from()
            return
        tried: set[int] = set()
        below: int | None = None
        if self.env.resume_from:
            prefix, step = split_checkpoint_uri(self.env.resume_from)
            if step is None:
                raise CheckpointError(
                    f"PHOENIX_RESUME_FROM={self.env.resume_from!r} does not name a step directory"
                    f" (…/step-NNNNNNNNNN); fix the operator's resume target")
            if prefix.rstrip("/") != self.storage.uri.rstrip("/"):
                self.log.warning("PHOENIX_RESUME_FROM points outside this phase's prefix %s;"
                                 " resuming from it anyway", self.storage.uri)
            store = self.storage if prefix.rstrip("/") == self.storage.uri.rstrip("/") else open_storage(prefix)
            info = verify_checkpoint(store, step, deep=False)
            if info.valid and self._try_load(store, info):
                return
            if not info.valid:
                self.log.warning("PHOENIX_RESUME_FROM=%s is not a valid checkpoint (%s); falling back"
                                 " to the previous valid checkpoint", info.uri, info.reason)
            tried.add(step)
            below = step
        while True:
            info = latest_valid_checkpoint(self.storage, deep=False, exclude_steps=tried, below_step=below)
            if info is None:
                break
            if self._try_load(self.storage, info):
                return
            tried.add(info.step)
        if tried:
            self.log.warning("no usable checkpoint under %s; starting from scratch", self.storage.uri)
        self._init_from()

    def _try_load(self, storage: Storage, info: CheckpointInfo) -> bool:
        assert info.manifest is not None
        if info.manifest.config_fingerprint != self.fingerprint:
            if not self.env.force_resume:
                raise ConfigMismatchError(
                    f"checkpoint {info.uri} was written with config {info.manifest.config_fingerprint}"
                    f" but this run's config is {self.fingerprint}; resuming would silently mix"
                    f" configs. Restore the old config, start a fresh prefix, or set"
                    f" PHOENIX_FORCE_RESUME=1 to resume anyway")
            self.log.warning("resuming %s across a config change (%s -> %s) because"
                             " PHOENIX_FORCE_RESUME=1", info.uri, info.manifest.config_fingerprint,
                             self.fingerprint)
        try:
            shards = load_checkpoint(storage, info)
        except CorruptCheckpointError as e:
            self.log.warning("checkpoint %s is unusable (%s); falling back to the previous valid"
                             " checkpoint", info.uri, e)
            return False
        self._apply(shards)
        self.resumed_from = info
        return True

    def _init_from(self) -> None:
        uri = self.env.init_from
        if not uri:
            return
        prefix, step = split_checkpoint_uri(uri)
        store = open_storage(prefix)
        info = verify_checkpoint(store, step, deep=False) if step is not None else latest_valid_checkpoint(store, deep=False)
        if info is None or not info.valid:
            raise CheckpointError(
                f"PHOENIX_INIT_FROM={uri!r} has no valid checkpoint"
                f" ({info.reason if info else 'nothing under that prefix'}); finish the previous phase first")
        shards = load_checkpoint(store, info)
        self.model.load_state_dict(shards["model.pt"], strict=self.init_strict)
        self.log.info("initialised weights from %s (phase %s, step %d)", info.uri,
                      info.manifest.phase if info.manifest else "?", info.step)

    # ------------------------------------------------------------------ state ------------
    def _data_state(self) -> dict:
        return {"epoch": self.epoch, "batchInEpoch": self.batch_in_epoch, "batchSize": self.batch_size,
                "accumulateGradBatches": self.accumulate, "loader": self.data.state_dict()}

    def _trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "samplesSeen": self.samples_seen,
                "trainSeconds": self.train_seconds, "runId": self.run_id, "attempt": self.attempt,
                "configFingerprint": self.fingerprint, "phase": self.env.phase}

    def _take_snapshot(self) -> Snapshot:
        tensors: dict[str, Any] = {"model.pt": self.model.state_dict(),
                                   "optimizer.pt": self.optimizer.state_dict()}
        if self.scheduler is not None:
            tensors["scheduler.pt"] = self.scheduler.state_dict()
        if self.scaler is not None:
            tensors["scaler.pt"] = self.scaler.state_dict()
        tensors["rng.pt"] = capture_rng()
        return Snapshot.take(self.step, self.epoch, tensors,
                             {"data.json": self._data_state(), "trainer.json": self._trainer_state()},
                             extra={"resumeExact": self.exactness.exact,
                                    "resumeExactReason": self.exactness.reason})

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
        self.epoch, self.batch_in_epoch = int(data["epoch"]), int(data["batchInEpoch"])
        self.step, self.samples_seen = int(tr["step"]), int(tr["samplesSeen"])
        self.train_seconds, self.run_id = float(tr["trainSeconds"]), str(tr["runId"]) or self.run_id

    def _apply_snapshot(self, snap: Snapshot) -> None:
        self._apply({**snap.tensors, **snap.documents})

    # ------------------------------------------------------------------ the loop ---------
    def _done(self) -> bool:
        return ((self.max_steps is not None and self.step >= self.max_steps)
                or (self.epochs is not None and self.epoch >= self.epochs))

    def _loop(self) -> str:
        while True:
            try:
                return self._run_epochs()
            except Exception as e:  # noqa: BLE001 - classified right below
                if isinstance(e, StageError) and e.step is None:
                    e.step = self.step + 1
                if not self._retryable(e):
                    raise
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
            if self.stop_requested:
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
                if self.stop_requested:
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
            if self.batch_in_epoch and self.batches_per_epoch is None and not self._done() and not self.stop_requested:
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
        due = ((self.interval_steps and self.step % self.interval_steps == 0)
               or (self.interval_seconds and self.clock() - self._last_ckpt_time >= self.interval_seconds))
        if due and not self._done():
            self.checkpoint()
        elif self.restart_method == "reload" and self.step % self.snapshot_interval == 0:
            self._last_good = self._take_snapshot()
        for cb in self.callbacks:
            cb.on_step_end(self, loss)

    def _after_epoch(self, epoch: int) -> None:
        if isinstance(self.model, StagedModule):
            self.model.log_timings(prefix=f"[{self.env.log_context}] epoch {epoch}: ")
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
        if self.metrics:
            self.metrics.emit("step", step=self.step, epoch=self.epoch, loss=loss, lossAvg=avg, lr=lr,
                              stepsPerSec=round(steps_per_sec, 3), samplesPerSec=round(samples_per_sec, 1),
                              trainSeconds=round(self.train_seconds, 3),
                              etaSeconds=round(eta, 1) if eta is not None else None, totalSteps=total)
            if self.checkpointer and self.clock() - self._last_metrics_upload >= self.metrics_interval:
                self._last_metrics_upload = self.clock()
                self.checkpointer.submit_aux(self.metrics.upload)

    def _on_commit(self, info: CheckpointInfo) -> None:  # runs on the upload thread
        if self.metrics:
            s = self.checkpointer.stats if self.checkpointer else None
            self.metrics.emit("checkpoint", step=info.step, epoch=info.epoch, checkpoint=info.uri,
                              saveSeconds=round(s.total_seconds[-1], 3) if s else None,
                              megabytes=round(sum(f.size for f in info.manifest.files.values()) / 1e6, 3)
                              if info.manifest else None)
            self.metrics.upload()
        for cb in self.callbacks:
            cb.on_checkpoint(self, info)

    # ------------------------------------------------------------------ the end ----------
    def _newest_checkpoint_uri(self) -> str | None:
        if self.checkpointer and self.checkpointer.latest:
            return self.checkpointer.latest.uri
        return self.resumed_from.uri if self.resumed_from else None

    def _has_checkpoint_at_step(self) -> bool:
        if self.checkpointer and self.checkpointer.latest and self.checkpointer.latest.step == self.step:
            return True
        return bool(self.resumed_from and self.resumed_from.step == self.step)

    def _finish(self, reason: str) -> RunResult:
        saved, message = False, ""
        if reason == REASON_COMPLETED:
            if self.checkpointer is not None:
                self.checkpointer.wait()
                if not self._has_checkpoint_at_step():
                    try:
                        self.checkpoint(blocking=True)
                    except Exception as e:  # noqa: BLE001 - report, do not crash a finished run
                        message = f"final checkpoint at step {self.step} failed: {e}"
                saved = self._has_checkpoint_at_step()
            message = message or f"training completed at step {self.step}"
            exit_code = EXIT_COMPLETED
        else:
            saved, message = self._emergency_save()
            exit_code = EXIT_PREEMPTED
        result = RunResult(reason, self.step, self.epoch, self._newest_checkpoint_uri(), saved,
                           message, exit_code, self.train_seconds, self.exactness)
        self._end(result)
        return result

    def _emergency_save(self) -> tuple[bool, str]:
        sig = signal.Signals(self._stop_signal).name if self._stop_signal else "stop"
        start = self._stop_time if self._stop_time is not None else self.clock()
        grace = self.env.grace_seconds

        def remaining() -> float:
            return grace - (self.clock() - start) - _EXIT_RESERVE_SECONDS

        if self.checkpointer is None:
            return False, f"{sig} at step {self.step}; no checkpoint storage configured, progress is lost"
        if not self.emergency_checkpoint:
            self.checkpointer.wait(timeout=max(0.0, remaining()))  # periodic saves still finish
            last = self._newest_checkpoint_uri()
            return False, (f"{sig} at step {self.step}; emergency checkpoints are disabled,"
                           f" resuming from {last or 'scratch'}")
        if self.step in self.checkpointer.pending_steps() or self._has_checkpoint_at_step():
            self.checkpointer.wait(timeout=max(0.0, remaining()))
            if self._has_checkpoint_at_step():
                return True, f"{sig} at step {self.step}; a checkpoint of this step already existed (0 steps lost)"
        nbytes = tree_nbytes(self.model.state_dict()) + tree_nbytes(self.optimizer.state_dict())
        need = self.checkpointer.estimate_save_seconds(nbytes)
        # Earlier uploads go first (one upload thread); let them use what time there is.
        flushed = self.checkpointer.wait(timeout=max(0.0, remaining()))
        left = remaining()
        last = self._newest_checkpoint_uri()
        base = (self.checkpointer.latest.step if self.checkpointer.latest else
                (self.resumed_from.step if self.resumed_from else 0))
        lost = self.step - base
        if need > left:
            return False, (f"{sig} at step {self.step}; grace period too short for an emergency"
                           f" checkpoint (need ~{need:.1f}s, {max(0.0, left):.1f}s left of {grace:.0f}s);"
                           f" resuming from {last or 'scratch'} loses {lost} steps")
        if not flushed:
            return False, (f"{sig} at step {self.step}; earlier uploads did not finish within the"
                           f" {grace:.0f}s grace period, no emergency checkpoint; resuming from"
                           f" {last or 'scratch'} loses {lost} steps")
        t0 = time.perf_counter()
        try:
            self.checkpoint(blocking=True)
        except Exception as e:  # noqa: BLE001 - report in the termination message instead
            return False, f"{sig} at step {self.step}; emergency checkpoint failed: {e}"
        return True, (f"{sig} at step {self.step}; emergency checkpoint saved in"
                      f" {time.perf_counter() - t0:.1f}s (estimated {need:.1f}s, 0 steps lost)")

    def _fail(self, e: BaseException) -> RunResult:
        msg = f"{type(e).__name__}: {e}"
        if self.checkpointer is not None:
            self.checkpointer.wait(timeout=10)  # finished uploads are still good fallbacks
        result = RunResult(REASON_FAILED, self.step, self.epoch, self._newest_checkpoint_uri(), False,
                           msg, EXIT_FAILED, self.train_seconds, self.exactness)
        try:
            self._end(result)
        except Exception:  # noqa: BLE001 - the original error matters more
            self.log.exception("while reporting failure")
        return result

    def _end(self, result: RunResult) -> None:
        self.log.info("%s at step %d: %s (checkpoint %s, exit %d, train %.1fs)", result.reason,
                      result.step, result.message, result.checkpoint, result.exit_code,
                      result.train_seconds)
        # The termination message first: it is what the operator reads, and the metrics upload
        # below is synchronous; with S3 unreachable it can outlast the grace period and the
        # kubelet's SIGKILL would otherwise lose the emergency-save result.
        result.termination_message().write(self.env.termination_log)
        if self.metrics:
            self.metrics.emit("end", reason=result.reason, step=result.step, epoch=result.epoch,
                              checkpoint=result.checkpoint, trainSeconds=round(result.train_seconds, 3),
                              emergencySaveCompleted=result.emergency_save_completed,
                              message=result.message)
            self.metrics.upload()
        for cb in self.callbacks:
            cb.on_end(self, result)


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
