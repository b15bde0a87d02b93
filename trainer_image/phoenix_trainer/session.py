"""A training process's link to Phoenix, for any training loop.

Everything Phoenix promises a trainer pod, without owning the loop: read the env contract,
restore the newest valid checkpoint (falling back over damaged ones, refusing a silent
config change), answer "checkpoint now?" and "stop now?" at step boundaries, save any state
asynchronously with the checkpoint layout and manifest, and finish with the termination
message and exit code the operator reads (an emergency checkpoint first, when SIGTERM came
and the grace period allows it). ``Trainer`` is built on it; the Lightning and transformers
callbacks are too. The loop stays the user's::

    with Session(config=cfg) as s:
        restored = s.restore()
        if restored:                      # resume: load what you saved
            model.load_state_dict(restored["model.pt"]); step = restored.step
        while step < total:
            train_one_step(); step += 1
            if s.stop_requested:          # SIGTERM: emergency checkpoint, exit 143
                raise SystemExit(s.finish("preempted", step, state=state()).exit_code)
            if s.should_checkpoint(step):
                s.save(step, state())     # async: only the CPU copy blocks
        raise SystemExit(s.finish("completed", step, state=state()).exit_code)

State is a flat dict of shard name -> object: names ending in ``.json`` are JSON documents,
everything else is written with ``torch.save`` (tensors, state dicts, RNG states).
``trainer.json`` (step, epoch, run id, attempt, config fingerprint, plus ``progress``) is
added by the session. Never does real work in the signal handler; never logs credentials.

The operator's requests (``control.py``) arrive as flags the same calls answer: a preemption
notice makes ``should_checkpoint`` true at the next step boundary; a handoff makes
``stop_requested`` true, and ``finish("preempted")`` then saves the final checkpoint and
fences the phase for the standby that takes over from it. Started as a standby
(``PHOENIX_ROLE=standby``), ``restore()`` returns only once the operator promotes this attempt
(the fence names it), having kept the newest committed checkpoint loaded meanwhile, so the
code before it (imports, model build) and the download are done ahead of need.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from . import prefetch
from .attempt_log import MetricsLog, next_attempt, process_start_time
from .checkpoint import AsyncCheckpointer, Snapshot, load_checkpoint
from .control import ControlPoller, start_status_server
from .core.contract import (
    EXIT_COMPLETED, EXIT_FAILED, EXIT_PREEMPTED, REASON_COMPLETED, REASON_FAILED, REASON_PREEMPTED,
    TerminationMessage, TrainerEnv,
)
from .core.errors import CheckpointError, ConfigMismatchError, CorruptCheckpointError
from .core.handshake import FENCE_NAME, Fence, advance_fence, read_fence
from .core.layout import (
    CheckpointInfo, config_fingerprint, latest_valid_checkpoint, split_checkpoint_uri,
    verify_checkpoint,
)
from .core.storage import Storage, open_storage
from .core.writer import RetryPolicy
from .determinism import EXACT, Exactness
from .tensors import tree_nbytes

log = logging.getLogger("phoenix.trainer")

# Time kept back from the grace period for writing the termination message and exiting.
EXIT_RESERVE_SECONDS = 1.0
# request_stop's "signal" for an operator-requested handoff (no real signal is 0), and how
# long its final checkpoint may take: no SIGTERM grace applies, nothing is killing the pod.
HANDOFF_SIGNAL = 0
HANDOFF_SAVE_LIMIT_SECONDS = 3600.0
TRAINER_DOC = "trainer.json"
# A waiting standby looks for a newer committed checkpoint to preload this often.
STANDBY_PREFETCH_SECONDS = 2.0


class StandbyEnded(SystemExit):
    """A standby was stopped (SIGTERM) or superseded before it was promoted: nothing to save;
    the termination message is written, the process exits as preempted."""


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


@dataclass
class Restored:
    """What to load. ``kind`` is "resume" (this phase's own checkpoint: load everything) or
    "init" (``PHOENIX_INIT_FROM``, a previous phase's checkpoint: load the weights only)."""

    kind: str
    step: int
    epoch: int
    info: CheckpointInfo
    state: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.state[name]

    def __contains__(self, name: object) -> bool:
        return name in self.state

    def get(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)

    @property
    def progress(self) -> dict[str, Any]:
        """The ``progress`` given to ``save`` (samples seen, productive seconds, ...)."""
        return dict((self.state.get(TRAINER_DOC) or {}).get("progress") or {})


class _Ctx(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['ctx']}] {msg}", kwargs


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors for torch.save, JSON documents) by shard name."""
    tensors = {k: v for k, v in state.items() if not k.endswith(".json")}
    docs = {k: v for k, v in state.items() if k.endswith(".json")}
    return tensors, docs


class Session:
    """One training process's Phoenix session; see the module docstring."""

    def __init__(
        self, *, config: Mapping[str, Any] | None = None, env: TrainerEnv | None = None,
        storage: Storage | None = None, checkpoint_interval_steps: int | None = None,
        checkpoint_interval_seconds: float | None = None, max_in_flight: int = 1,
        retry_policy: RetryPolicy | None = None, install_signal_handlers: bool = True,
        clock: Callable[[], float] = time.monotonic, emergency_checkpoint: bool = True,
        exactness: Exactness = EXACT, metrics_interval_seconds: float = 30.0,
    ) -> None:
        # Where a start-up's seconds go (the start record's ``startup``): the process's own
        # start, this session's creation (the script's imports and model build come before
        # it), a standby's wait, the restore.
        self._startup: dict[str, float] = {"session": time.time()}
        self._prefetched: dict[str, Any] | None = None
        self.config = dict(config or {})
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
        self.max_in_flight, self.retry_policy = max_in_flight, retry_policy
        self.clock = clock
        # Off only to measure what the SIGTERM emergency checkpoint is worth (benchmarks).
        self.emergency_checkpoint = emergency_checkpoint
        self.exactness = exactness
        self.metrics_interval = metrics_interval_seconds
        self.log = _Ctx(log, {"ctx": self.env.log_context})
        self.run_id = uuid.uuid4().hex[:12]
        self.attempt = 0
        self.resumed_from: CheckpointInfo | None = None
        self.checkpointer: AsyncCheckpointer | None = None
        self.metrics: MetricsLog | None = None
        self.after_commit: list[Callable[[CheckpointInfo], None]] = []
        self._stop_signal: int | None = None
        self._stop_label = ""
        self._stop_time: float | None = None
        self._checkpoint_now = ""  # a pending "checkpoint now" request id (a notice)
        self._handoff: tuple[int, str] | None = None  # (standby attempt, its pod)
        self._warm: Restored | None = None  # a standby's preloaded checkpoint
        self._resume_target: str | None = self.env.resume_from
        self.control: ControlPoller | None = None
        self.status_server = start_status_server(self.env.status_port) if self._serves_status() else None
        self._last_ckpt_time = clock()
        self._last_metrics_upload = clock()
        self._previous_handler: Any = None
        self._restored = False
        self._finished: RunResult | None = None
        self.last_step = 0  # the newest step boundary the loop told us about
        if install_signal_handlers:
            self.install_signal_handler()

    # ------------------------------------------------------------------ signals ----------
    def install_signal_handler(self) -> None:
        """SIGTERM -> ``request_stop`` (main thread only; ``close`` puts the old one back)."""
        if threading.current_thread() is not threading.main_thread() or self._previous_handler is not None:
            return

        def handler(signum, frame):  # only a flag: never do real work in a signal handler
            self.request_stop(signum)

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def request_stop(self, signum: int = signal.SIGTERM, label: str = "") -> None:
        """Ask the loop to stop at its next step boundary (what the SIGTERM handler does)."""
        if self._stop_signal is None:
            self._stop_time = self.clock()
            self._stop_label = label or signal.Signals(signum).name
            self._stop_signal = signum

    # ------------------------------------------------------------------ operator requests -
    def _on_checkpoint_now(self, request: str) -> None:  # control thread: flags only
        self._checkpoint_now = request
        self.log.info("operator asks for a checkpoint now (%s)", request)

    def _on_handoff(self, attempt: int, pod: str) -> None:  # control thread: flags only
        self._handoff = (attempt, pod)
        self.log.info("operator asks to hand off to standby attempt %d (pod %s) at the next"
                      " step boundary", attempt, pod or "?")
        self.request_stop(HANDOFF_SIGNAL, label=f"handoff to attempt {attempt}")

    def _serves_status(self) -> bool:
        """Whether this process answers the pod's readiness probe (one per pod)."""
        return True

    def _polls_control(self) -> bool:
        """Whether this process reads control.json (a gang: rank 0; the flags are shared)."""
        return True

    def _start_control(self) -> None:
        if self.storage is None or self.env.attempt is None or not self._polls_control():
            return
        self.control = ControlPoller(self.storage, self.attempt, self.env.control_poll_seconds,
                                     on_checkpoint=self._on_checkpoint_now,
                                     on_handoff=self._on_handoff, uid=self.env.job_uid).start()

    def _mark_ready(self) -> None:
        if self.status_server is not None:
            self.status_server.ready.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop_signal is not None

    def should_stop(self, step: int) -> bool:
        """Stop at this step boundary? (In a gang: does any rank want to; all agree.)"""
        self.last_step = step
        return self.stop_requested

    def _all_agree(self, ok: bool) -> bool:
        """True iff every process of the run says ``ok`` (one process: itself)."""
        return ok

    # ------------------------------------------------------------------ restore ----------
    def restore(self) -> Restored | None:
        """Load the newest valid checkpoint of this phase (or ``PHOENIX_RESUME_FROM``'s),
        else the previous phase's weights (``PHOENIX_INIT_FROM``), else None. Opens the
        asynchronous checkpointer and starts the metrics log; call it once, before training."""
        if self._restored:
            raise RuntimeError("Session.restore() was already called")
        self._restored = True
        began = time.time()
        if self.storage is not None:
            self.attempt = self.env.attempt if self.env.attempt is not None else next_attempt(self.storage)
        else:
            self.attempt = self.env.attempt or 0
        if self.env.standby:
            self._resume_target = self._wait_as_standby()
            self._startup["standby"] = time.time() - began
            began = time.time()
        restored = self._find_own() if self.storage is not None else None
        if restored is None:
            restored = self._init_from()
        else:
            self.resumed_from = restored.info
            self.run_id = str((restored.get(TRAINER_DOC) or {}).get("runId") or self.run_id)
        if self.storage is not None:
            self.checkpointer = AsyncCheckpointer(
                self.storage, phase=self.env.phase, config_fingerprint=self.fingerprint,
                keep=self.env.checkpoint_keep, run_id=self.run_id, attempt=self.attempt,
                uid=self.env.job_uid, max_in_flight=self.max_in_flight, retry=self.retry_policy,
                protect=[self.resumed_from.step] if self.resumed_from else [])
            self.checkpointer.after_commit.append(self._on_commit)
        self.metrics = MetricsLog(self.storage, self.attempt, {
            "runId": self.run_id, "attempt": self.attempt, "phase": self.env.phase})
        self._last_ckpt_time = self._last_metrics_upload = self.clock()
        self._warm = None
        self._start_control()
        self._mark_ready()
        self._startup["restore"] = time.time() - began
        self._end_prefetch()
        return restored

    def _end_prefetch(self) -> None:
        """Drop what the start-up prefetch holds; say what it did."""
        pre = prefetch.release()
        if pre is None:
            return
        self._prefetched = pre.summary()
        if pre.error:
            self.log.warning("prefetching %s during start-up did not work (%s); the restore"
                             " downloaded it", pre.uri, pre.error)
        elif self.resumed_from is not None and self.resumed_from.uri.rstrip("/") == pre.uri:
            self.log.info("checkpoint %s was downloaded during start-up (%.1f MB; the restore"
                          " waited %.2fs for it)", pre.uri, pre.nbytes / 1e6, pre.waited)

    # ------------------------------------------------------------------ standby ----------
    def _wait_as_standby(self) -> str | None:
        """Wait until the fence names this attempt; meanwhile keep the newest committed
        checkpoint loaded (``_warm``). Returns the checkpoint the fence says to resume from
        (None: the newest valid one). SIGTERM or a newer fence ends the process."""
        if self.storage is None:
            raise CheckpointError("a standby needs checkpoint storage (PHOENIX_CHECKPOINT_URI)")
        self.log.info("standby attempt %d: waiting for promotion (polling %s every %.2fs)",
                      self.attempt, self.storage.uri, self.env.control_poll_seconds)
        next_prefetch = 0.0
        while True:
            if self.stop_requested:
                self._end_standby(f"standby attempt {self.attempt} stopped ({self._stop_label})"
                                  " before it was promoted")
            fence = self._read_fence()
            uid = self.env.job_uid
            if fence is not None and fence.attempt == self.attempt and fence.holds(self.attempt, uid):
                self.log.info("standby attempt %d promoted (resume from %s)", self.attempt,
                              fence.resume_from or "the newest valid checkpoint")
                return fence.resume_from or None
            if fence is not None and not fence.holds(self.attempt, uid):
                other = f" of job {fence.job}" if uid and fence.uid and fence.uid != uid else ""
                self._end_standby(f"standby attempt {self.attempt} superseded by attempt"
                                  f" {fence.attempt}{other} before it was promoted")
            if self.clock() >= next_prefetch:
                self._prefetch()
                self._mark_ready()
                next_prefetch = self.clock() + STANDBY_PREFETCH_SECONDS
            time.sleep(self.env.control_poll_seconds)

    def _read_fence(self) -> Fence | None:
        assert self.storage is not None
        try:
            return read_fence(self.storage)
        except Exception as e:  # noqa: BLE001 - keep waiting; promotion is only ever by the fence
            self.log.warning("standby: cannot read %s (%s: %s)", FENCE_NAME, type(e).__name__, e)
            return None

    def _prefetch(self) -> None:
        """Load (this process's part of) the newest valid checkpoint if it is newer than the
        one held. No collectives: every process of a gang does this on its own."""
        assert self.storage is not None
        try:
            info = latest_valid_checkpoint(self.storage, deep=False)
            if info is None or (self._warm is not None and self._warm.info.uri == info.uri):
                return
            t0 = time.perf_counter()
            self._warm = None  # so _try_load loads it (and may reuse its download folder)
            warm = self._try_load(self.storage, info)
        except ConfigMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - a standby retries; the resume verifies again
            self.log.warning("standby: preloading the newest checkpoint failed (%s: %s)",
                             type(e).__name__, e)
            return
        if warm is not None:
            self._warm = warm
            self.log.info("standby: holding checkpoint step %d in memory (loaded in %.2fs)",
                          info.step, time.perf_counter() - t0)

    def _end_standby(self, why: str) -> None:
        self.log.info("%s", why)
        self._finished = RunResult(REASON_PREEMPTED, 0, 0, None, False, why, EXIT_PREEMPTED, 0.0,
                                   self.exactness)
        self._finished.termination_message().write(self.env.termination_log)
        raise StandbyEnded(EXIT_PREEMPTED)

    def _find_own(self) -> Restored | None:
        assert self.storage is not None
        tried: set[int] = set()
        below: int | None = None
        if self._resume_target:
            prefix, step = split_checkpoint_uri(self._resume_target)
            if step is None:
                raise CheckpointError(
                    f"PHOENIX_RESUME_FROM={self._resume_target!r} does not name a step directory"
                    f" (…/step-NNNNNNNNNN); fix the operator's resume target")
            same = prefix.rstrip("/") == self.storage.uri.rstrip("/")
            if not same:
                self.log.warning("PHOENIX_RESUME_FROM points outside this phase's prefix %s;"
                                 " resuming from it anyway", self.storage.uri)
            store = self.storage if same else open_storage(prefix)
            info = verify_checkpoint(store, step, deep=False)
            if info.valid:
                loaded = self._try_load(store, info)
                if loaded is not None:
                    return loaded
            else:
                self.log.warning("PHOENIX_RESUME_FROM=%s is not a valid checkpoint (%s); falling back"
                                 " to the previous valid checkpoint", info.uri, info.reason)
            tried.add(step)
            below = step
        while True:
            info = latest_valid_checkpoint(self.storage, deep=False, exclude_steps=tried, below_step=below)
            if info is None:
                break
            loaded = self._try_load(self.storage, info)
            if loaded is not None:
                return loaded
            tried.add(info.step)
        if tried:
            self.log.warning("no usable checkpoint under %s; starting from scratch", self.storage.uri)
        return None

    def _try_load(self, storage: Storage, info: CheckpointInfo) -> Restored | None:
        assert info.manifest is not None
        self._check_config(info)
        if self._warm is not None and self._warm.info.uri == info.uri:
            self.log.info("resuming from the preloaded checkpoint step %d", info.step)
            return self._warm
        try:
            state = self._load(storage, info)
        except CorruptCheckpointError as e:
            self.log.warning("checkpoint %s is unusable (%s); falling back to the previous valid"
                             " checkpoint", info.uri, e)
            return None
        return Restored("resume", info.step, info.manifest.epoch, info, state)

    def _check_config(self, info: CheckpointInfo) -> None:
        """Refuse to resume across a config change, unless PHOENIX_FORCE_RESUME=1."""
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

    def _load(self, storage: Storage, info: CheckpointInfo) -> dict[str, Any]:
        """Download, verify (size, sha256) and deserialize this process's part of ``info``
        (the shards a ``prefetch`` already holds are not downloaded again)."""
        pre = prefetch.current()
        return load_checkpoint(storage, info, None if pre is None else (
            lambda name: pre.take(info.uri, name)))

    def _init_from(self) -> Restored | None:
        uri = self.env.init_from
        if not uri:
            return None
        prefix, step = split_checkpoint_uri(uri)
        store = open_storage(prefix)
        info = verify_checkpoint(store, step, deep=False) if step is not None else latest_valid_checkpoint(store, deep=False)
        if info is None or not info.valid:
            raise CheckpointError(
                f"PHOENIX_INIT_FROM={uri!r} has no valid checkpoint"
                f" ({info.reason if info else 'nothing under that prefix'}); finish the previous phase first")
        state = load_checkpoint(store, info)
        self.log.info("initialising weights from %s (phase %s, step %d)", info.uri,
                      info.manifest.phase if info.manifest else "?", info.step)
        return Restored("init", 0, 0, info, state)

    def startup(self) -> dict[str, Any]:
        """Seconds of this process's start-up so far: ``beforeSession`` (interpreter, imports,
        model build: the script's part), ``standbyWait`` (a standby's wait for promotion),
        ``restore`` (finding, downloading and loading the checkpoint), ``total`` (from the
        process's start until now); ``processStart`` is when the kernel started it;
        ``prefetch`` what the start-up prefetch downloaded (``prefetch.Prefetch.summary``)."""
        now, began = time.time(), process_start_time()
        out: dict[str, Any] = {}
        if began is not None:
            out["processStart"] = datetime.fromtimestamp(began, timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z")
            out["beforeSession"] = round(self._startup["session"] - began, 3)
            out["total"] = round(now - began, 3)
        if "standby" in self._startup:
            out["standbyWait"] = round(self._startup["standby"], 3)
        if "restore" in self._startup:
            out["restore"] = round(self._startup["restore"], 3)
        if self._prefetched is not None:
            out["prefetch"] = self._prefetched
        return out

    def started(self, step: int, epoch: int = 0, **fields: Any) -> None:
        """Record the start (or resume) in the log and the metrics; call after loading."""
        startup = self.startup()
        if self.metrics:
            self.metrics.emit("resume" if self.resumed_from else "start", step=step, epoch=epoch,
                              checkpoint=self.resumed_from.uri if self.resumed_from else None,
                              configFingerprint=self.fingerprint, resumeExact=self.exactness.exact,
                              resumeExactReason=self.exactness.reason, startup=startup, **fields)
        if not self.exactness.exact:
            self.log.warning("a resume of this run will not be bit-exact: %s", self.exactness.reason)
        # The pid shows whether the trainer is its container's PID 1 (it must be, or a shell
        # in front of it swallows the kubelet's SIGTERM).
        self.log.info("%s run %s attempt %d at step %d (epoch %d), config %s, pid %d%s",
                      "resuming" if self.resumed_from else "starting", self.run_id, self.attempt,
                      step, epoch, self.fingerprint, os.getpid(), _describe_startup(startup))

    # ------------------------------------------------------------------ saving -----------
    def should_checkpoint(self, step: int) -> bool:
        """A periodic checkpoint is due at this step boundary (interval in steps or seconds)."""
        self.last_step = step
        return bool(self._checkpoint_now
                    or (self.interval_steps and step % self.interval_steps == 0)
                    or (self.interval_seconds and self.clock() - self._last_ckpt_time >= self.interval_seconds))

    def snapshot(self, step: int, epoch: int, state: Mapping[str, Any],
                 progress: Mapping[str, Any] | None = None) -> Snapshot:
        """A CPU copy of ``state`` plus ``trainer.json``: the only part of a save that blocks."""
        tensors, docs = split_state(state)
        docs[TRAINER_DOC] = {**docs.get(TRAINER_DOC, {}), "step": step, "epoch": epoch,
                             "runId": self.run_id, "attempt": self.attempt,
                             "configFingerprint": self.fingerprint, "phase": self.env.phase,
                             "progress": dict(progress or {})}
        return Snapshot.take(step, epoch, tensors, docs,
                             extra={"resumeExact": self.exactness.exact,
                                    "resumeExactReason": self.exactness.reason})

    def save(self, step: int, state: Mapping[str, Any] | Snapshot, *, epoch: int = 0,
             progress: Mapping[str, Any] | None = None, blocking: bool = False) -> Future | None:
        """Checkpoint ``state`` (or a snapshot already taken) as ``step-N``, in the background."""
        snap = state if isinstance(state, Snapshot) else self.snapshot(step, epoch, state, progress)
        self._last_ckpt_time = self.clock()
        if self._checkpoint_now:
            self.log.info("checkpoint of step %d taken at the operator's request (%s)", step,
                          self._checkpoint_now)
            self._checkpoint_now = ""
        self.last_step = step
        if self.checkpointer is None:
            return None
        fut = self.checkpointer.save(snap, blocking=blocking)
        if blocking:
            fut.result()
        return fut

    def _on_commit(self, info: CheckpointInfo) -> None:  # runs on the upload thread
        if self.metrics:
            s = self.checkpointer.stats if self.checkpointer else None
            self.metrics.emit("checkpoint", step=info.step, epoch=info.epoch, checkpoint=info.uri,
                              saveSeconds=round(s.total_seconds[-1], 3) if s else None,
                              megabytes=round(sum(f.size for f in info.manifest.files.values()) / 1e6, 3)
                              if info.manifest else None)
            self.metrics.upload()
        for fn in self.after_commit:
            fn(info)

    def emit(self, event: str, **fields: Any) -> None:
        """A metrics record (``metrics/attempt-N.jsonl``); uploaded now and then, off the loop."""
        if self.metrics is None:
            return
        self.metrics.emit(event, **fields)
        if self.checkpointer and self.clock() - self._last_metrics_upload >= self.metrics_interval:
            self._last_metrics_upload = self.clock()
            self.checkpointer.submit_aux(self.metrics.upload)

    @property
    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint this process committed, else the one it resumed from."""
        if self.checkpointer and self.checkpointer.latest:
            return self.checkpointer.latest
        return self.resumed_from

    def has_checkpoint_at(self, step: int) -> bool:
        latest = self.latest
        return latest is not None and latest.step == step

    # ------------------------------------------------------------------ the end ----------
    def finish(self, reason: str, step: int, *, epoch: int = 0,
               state: Mapping[str, Any] | Snapshot | Callable[[], Mapping[str, Any] | Snapshot] | None = None,
               progress: Mapping[str, Any] | None = None, train_seconds: float = 0.0) -> RunResult:
        """End the run: "completed" saves a final checkpoint of ``step`` if none exists;
        "preempted" saves an emergency checkpoint if the grace period allows it. Writes the
        termination message and returns the result (``exit_code`` for ``sys.exit``).

        ``state`` may be a callable so that a stop too close to the grace deadline does not
        even pay for building it; its size is what the time estimate is made from."""
        if reason not in (REASON_COMPLETED, REASON_PREEMPTED):
            raise ValueError(f"finish(reason={reason!r}): use 'completed' or 'preempted' (or fail())")
        saved, message = False, ""
        if reason == REASON_COMPLETED:
            if self.checkpointer is not None:
                self.checkpointer.wait()
                if not self.has_checkpoint_at(step) and state is not None:
                    try:
                        self.save(step, _resolve(state), epoch=epoch, progress=progress, blocking=True)
                    except Exception as e:  # noqa: BLE001 - report, do not crash a finished run
                        message = f"final checkpoint at step {step} failed: {e}"
                saved = self.has_checkpoint_at(step)
            message = message or f"training completed at step {step}"
            exit_code = EXIT_COMPLETED
        else:
            saved, message = self._emergency_save(step, epoch, state, progress)
            if self._handoff is not None and saved:
                message += self._hand_off()
            exit_code = EXIT_PREEMPTED
        latest = self.latest
        result = RunResult(reason, step, epoch, latest.uri if latest else None, saved, message,
                           exit_code, train_seconds, self.exactness)
        self._end(result)
        return result

    def _emergency_save(self, step: int, epoch: int, state: Any,
                        progress: Mapping[str, Any] | None) -> tuple[bool, str]:
        sig = self._stop_label or "stop"
        start = self._stop_time if self._stop_time is not None else self.clock()
        grace = self.env.grace_seconds
        if self._handoff is not None and self._stop_signal == HANDOFF_SIGNAL:
            # The operator asked for a handoff; nothing is killing this pod: the final
            # checkpoint is made whatever the SIGTERM grace would allow. (Should the reclaim
            # come meanwhile, the kubelet's SIGKILL may cut the save short: a partial
            # checkpoint has no manifest and is never resumed from.)
            grace = HANDOFF_SAVE_LIMIT_SECONDS

        def remaining() -> float:
            return grace - (self.clock() - start) - EXIT_RESERVE_SECONDS

        def resume_point() -> tuple[str, int]:
            latest = self.latest
            return (latest.uri if latest else "scratch"), step - (latest.step if latest else 0)

        if self.checkpointer is None:
            return False, f"{sig} at step {step}; no checkpoint storage configured, progress is lost"
        if step in self.checkpointer.pending_steps() or self.has_checkpoint_at(step):
            self.checkpointer.wait(timeout=max(0.0, remaining()))
            if self.has_checkpoint_at(step):
                return True, f"{sig} at step {step}; a checkpoint of this step already existed (0 steps lost)"
        verdict: str | None = None  # why this process cannot save now (None: it can)
        if not self.emergency_checkpoint or state is None:
            self.checkpointer.wait(timeout=max(0.0, remaining()))  # periodic saves still finish
            why = "emergency checkpoints are disabled" if not self.emergency_checkpoint else "no state given"
            verdict = f"{sig} at step {step}; {why}, resuming from {resume_point()[0]}"
            need = 0.0
        else:
            state = _resolve(state)
            nbytes = state.nbytes if isinstance(state, Snapshot) else tree_nbytes(split_state(state)[0])
            need = self.checkpointer.estimate_save_seconds(nbytes)
            # Earlier uploads go first (one upload thread); let them use what time there is.
            flushed = self.checkpointer.wait(timeout=max(0.0, remaining()))
            left = remaining()
            last, lost = resume_point()
            if need > left:
                verdict = (f"{sig} at step {step}; grace period too short for an emergency"
                           f" checkpoint (need ~{need:.1f}s, {max(0.0, left):.1f}s left of {grace:.0f}s);"
                           f" resuming from {last} loses {lost} steps")
            elif not flushed:
                verdict = (f"{sig} at step {step}; earlier uploads did not finish within the"
                           f" {grace:.0f}s grace period, no emergency checkpoint; resuming from"
                           f" {last} loses {lost} steps")
        if not self._all_agree(verdict is None):  # a gang saves together or not at all
            return False, verdict or (f"{sig} at step {step}; a peer rank could not save within"
                                      f" its grace period; resuming from {resume_point()[0]}")
        t0 = time.perf_counter()
        try:
            self.save(step, state, epoch=epoch, progress=progress, blocking=True)
        except Exception as e:  # noqa: BLE001 - report in the termination message instead
            return False, f"{sig} at step {step}; emergency checkpoint failed: {e}"
        return True, (f"{sig} at step {step}; emergency checkpoint saved in"
                      f" {time.perf_counter() - t0:.1f}s (estimated {need:.1f}s, 0 steps lost)")

    def _hand_off(self) -> str:
        """After the final checkpoint: fence the phase for the standby, naming that checkpoint,
        so it starts at once (the operator would, too, once it sees this pod end)."""
        assert self._handoff is not None and self.storage is not None and self.latest is not None
        attempt, pod = self._handoff
        try:
            env = self.env
            advance_fence(self.storage, Fence(
                attempt, pod, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                resume_from=self.latest.uri, uid=env.job_uid,
                job=f"{env.job_namespace}/{env.job_name}" if env.job_name else ""))
        except Exception as e:  # noqa: BLE001 - the operator promotes the standby anyway
            self.log.warning("handoff: cannot write %s (%s: %s); the operator will promote"
                             " attempt %d when this pod ends", FENCE_NAME, type(e).__name__, e,
                             attempt)
            return f"; handoff fence not written ({type(e).__name__})"
        self.log.info("handed off to attempt %d at %s", attempt, self.latest.uri)
        return f"; handed off to attempt {attempt}"

    def fail(self, error: BaseException, step: int, *, epoch: int = 0,
             train_seconds: float = 0.0) -> RunResult:
        """End the run as failed (exit 1): finished uploads stay as fallbacks."""
        msg = f"{type(error).__name__}: {error}"
        if self.checkpointer is not None:
            self.checkpointer.wait(timeout=10)
        latest = self.latest
        result = RunResult(REASON_FAILED, step, epoch, latest.uri if latest else None, False, msg,
                           EXIT_FAILED, train_seconds, self.exactness)
        try:
            self._end(result)
        except Exception:  # noqa: BLE001 - the original error matters more
            self.log.exception("while reporting failure")
        return result

    def _end(self, result: RunResult) -> None:
        self._finished = result
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

    @property
    def result(self) -> RunResult | None:
        return self._finished

    def close(self) -> None:
        """Put the SIGTERM handler back and stop the upload thread (after a stop, at once)."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        if self.control is not None:
            self.control.stop()
        if self.status_server is not None:
            # Answer the readiness probe until the process exits (atexit): closed now, the
            # probe fails while the container writes its termination message and exits, and
            # every clean end leaves "Unhealthy" warnings in the job's events.
            self.status_server.close_at_exit()
        if self.checkpointer is not None:
            # After a preemption we already spent what the grace period allowed.
            self.checkpointer.close(timeout=0 if self.stop_requested else None)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None and self._finished is None and not isinstance(exc, SystemExit):
                self.fail(exc, step=self.last_step)
        finally:
            self.close()


def _describe_startup(startup: Mapping[str, Any]) -> str:
    """", up 3.1s (2.8s before the session, restore 0.12s)" for the start log line."""
    if "total" not in startup:
        return ""
    parts = [f"{startup['beforeSession']:.1f}s before the session"]
    if "standbyWait" in startup:
        parts.append(f"{startup['standbyWait']:.1f}s as a standby")
    if "restore" in startup:
        parts.append(f"restore {startup['restore']:.2f}s")
    return f", up {startup['total']:.1f}s ({', '.join(parts)})"


def _resolve(state: Any) -> Any:
    return state() if callable(state) else state
