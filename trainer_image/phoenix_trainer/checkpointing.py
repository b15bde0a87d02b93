"""A session's periodic checkpoints: when one is due, the snapshot, the background save, the
metrics that ride along, and which checkpoint is the newest.

``Checkpointing`` owns the ``AsyncCheckpointer`` (opened once the restore knows the run id
and what to protect) and the metrics log. How a state becomes a ``Snapshot`` and how an
uploaded checkpoint is committed are parts handed in: ``LocalSnapshots`` and
``writer.commit_checkpoint`` for one process; a process group supplies its own (DCP shards,
a manifest listing every rank's files: distributed.py). ``RunIdentity`` is what every part
reads about the run (config fingerprint, run id, attempt, exactness, the resumed checkpoint).

Never blocks the training thread beyond the CPU copy, never decides whether to stop, and
never writes the termination message (finish.py does).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from .attempt_log import MetricsLog
from .checkpoint import TRAINER_DOC, AsyncCheckpointer, Snapshot, split_state
from .core.contract import TrainerEnv
from .core.errors import CheckpointError
from .core.layout import CheckpointInfo
from .core.storage import Storage
from .determinism import EXACT, Exactness
from .policies import CheckpointPolicy
from .tensors import snapshot_threads, unloadable_globals


@dataclass
class RunIdentity:
    """What the parts of a session share about the run; the restore fills in the rest."""

    config: dict[str, Any]
    fingerprint: str
    phase: str
    run_id: str
    attempt: int = 0
    exactness: Exactness = EXACT
    resumed_from: CheckpointInfo | None = None


class Snapshots(Protocol):
    # ``defer``: tensors whose copy may finish after ``take`` returns (``Snapshot.settle``);
    # an implementation may copy them at once instead.
    def take(self, step: int, epoch: int, state: Mapping[str, Any], trainer_doc: dict[str, Any],
             extra: dict[str, Any], spool: str | None,
             defer: Callable[[Any], bool] | None = None) -> Snapshot: ...


class LocalSnapshots:
    """One process's state -> a ``Snapshot``: tensors for torch.save, JSON documents, and
    ``trainer.json`` merged with what the caller put there.

    An entry a restore could not load (``torch.load(weights_only=True)`` refuses a numpy
    array or a class of the script's own) is refused here, at its first save, rather than
    saved into checkpoints that every restore would then skip."""

    def __init__(self) -> None:
        self.checked: set[str] = set()  # entry names whose structure passed (first save only)
        self.threads = snapshot_threads()  # read (and refused if malformed) at the start

    def take(self, step: int, epoch: int, state: Mapping[str, Any], trainer_doc: dict[str, Any],
             extra: dict[str, Any], spool: str | None,
             defer: Callable[[Any], bool] | None = None) -> Snapshot:
        tensors, docs = split_state(state)
        for name in sorted(set(tensors) - self.checked):
            refused = unloadable_globals(tensors[name])
            if refused:
                raise CheckpointError(
                    f"checkpoint entry {name!r} holds {', '.join(refused)}, which a restore"
                    " (torch.load(weights_only=True)) refuses: store tensors, numbers, strings and"
                    " dicts/lists/tuples of them (torch.from_numpy for a numpy array), or make it a"
                    " JSON entry (a name ending in .json)")
            self.checked.add(name)
        docs[TRAINER_DOC] = {**docs.get(TRAINER_DOC, {}), **trainer_doc}
        return Snapshot.take(step, epoch, tensors, docs, extra=extra, threads=self.threads,
                             defer=defer)


class Checkpointing:
    """Periodic checkpoints of one session; see the module docstring."""

    def __init__(self, *, env: TrainerEnv, storage: Storage | None, run: RunIdentity,
                 policy: CheckpointPolicy, metrics_interval_seconds: float,
                 clock: Callable[[], float], log: logging.LoggerAdapter,
                 snapshots: Snapshots | None = None, commit: Callable[..., CheckpointInfo] | None = None,
                 leads: bool = True) -> None:
        self.env, self.storage, self.run, self.clock, self.log = env, storage, run, clock, log
        self.interval_steps = policy.interval_steps or env.checkpoint_interval_steps
        self.interval_seconds = policy.interval_seconds or env.checkpoint_interval_seconds
        self.policy = policy
        self.metrics_interval = metrics_interval_seconds
        self.snapshots = snapshots or LocalSnapshots()
        self.commit = commit
        self.leads = leads  # retention and the metrics file are the leader's
        self.checkpointer: AsyncCheckpointer | None = None
        self.metrics: MetricsLog | None = None
        self.after_commit: list[Callable[[CheckpointInfo], None]] = []
        self.requested = ""  # a pending "checkpoint now" request id (a notice)
        self._last_save = clock()
        self._blocked: dict[int, float] = {}  # step -> seconds its snapshot held the loop
        self._last_metrics_upload = clock()

    def open(self) -> None:
        """Start the uploads and the metrics log (after the restore set the run's identity)."""
        run = self.run
        if self.storage is not None:
            self.checkpointer = AsyncCheckpointer(
                self.storage, phase=self.env.phase, config_fingerprint=run.fingerprint,
                keep=self.env.checkpoint_keep, run_id=run.run_id, attempt=run.attempt,
                uid=self.env.job_uid, max_in_flight=self.policy.max_in_flight, retry=self.policy.retry,
                protect=[run.resumed_from.step] if run.resumed_from else [], commit=self.commit,
                retention=self.leads)
            self.checkpointer.after_commit.append(self._on_commit)
        if self.leads:  # one metrics file per attempt
            self.metrics = MetricsLog(self.storage, run.attempt, {
                "runId": run.run_id, "attempt": run.attempt, "phase": self.env.phase})
        self._last_save = self._last_metrics_upload = self.clock()

    def request_now(self, request: str) -> None:  # control thread: a flag only
        self.requested = request
        self.log.info("operator asks for a checkpoint now (%s)", request)

    def due(self, step: int) -> bool:
        """A checkpoint is due at this step boundary (a request, or the interval)."""
        return bool(self.requested
                    or (self.interval_steps and step % self.interval_steps == 0)
                    or (self.interval_seconds and self.clock() - self._last_save >= self.interval_seconds))

    def snapshot(self, step: int, epoch: int, state: Mapping[str, Any],
                 progress: Mapping[str, Any] | None = None,
                 defer: Callable[[Any], bool] | None = None) -> Snapshot:
        run = self.run
        doc = {"step": step, "epoch": epoch, "runId": run.run_id, "attempt": run.attempt,
               "configFingerprint": run.fingerprint, "phase": self.env.phase,
               "progress": dict(progress or {})}
        return self.snapshots.take(step, epoch, state, doc,
                                   {"resumeExact": run.exactness.exact,
                                    "resumeExactReason": run.exactness.reason},
                                   self.checkpointer.spool if self.checkpointer else None,
                                   defer)

    def save(self, step: int, state: Mapping[str, Any] | Snapshot, *, epoch: int = 0,
             progress: Mapping[str, Any] | None = None, blocking: bool = False) -> Future | None:
        snap = state if isinstance(state, Snapshot) else self.snapshot(step, epoch, state, progress)
        self._blocked[snap.step] = snap.seconds  # for its commit's metrics record
        self._last_save = self.clock()
        if self.requested:
            self.log.info("checkpoint of step %d taken at the operator's request (%s)", step,
                          self.requested)
            self.requested = ""
        if self.checkpointer is None:
            return None
        fut = self.checkpointer.save(snap, blocking=blocking)
        if blocking:
            fut.result()
        return fut

    def _on_commit(self, info: CheckpointInfo) -> None:  # runs on the upload thread
        if self.metrics:
            s = self.checkpointer.stats if self.checkpointer else None
            blocked = self._blocked.pop(info.step, None)
            self.metrics.emit("checkpoint", step=info.step, epoch=info.epoch, checkpoint=info.uri,
                              saveSeconds=round(s.total_seconds[-1], 3) if s else None,
                              blockedSeconds=round(blocked, 4) if blocked is not None else None,
                              megabytes=round(sum(f.size for f in info.manifest.files.values()) / 1e6, 3)
                              if info.manifest else None)
            self.metrics.upload()
        for fn in self.after_commit:
            fn(info)

    def emit(self, event: str, **fields: Any) -> None:
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
        return self.run.resumed_from

    def has_checkpoint_at(self, step: int) -> bool:
        latest = self.latest
        return latest is not None and latest.step == step

    def close(self, timeout: float | None) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close(timeout=timeout)
