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

Built by composition (docs/trainer.md, "How a session is built"): ``StopRequest``
(stopping.py), ``Checkpointing`` (checkpointing.py), ``Restorer`` (restore.py), ``Standby``
(standby.py), ``Finisher`` (finish.py) and the ``Peers`` the collective decisions go through
(peers.py). A process group supplies its own peers, snapshots, commit and loader
(distributed.py); nothing overrides this class's methods. The session itself only wires them
together and keeps the start-up record; it must never grow a decision of its own.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from . import prefetch as prefetch_mod
from .attempt_log import next_attempt, process_start_time
from .checkpoint import TRAINER_DOC, Snapshot, split_state
from .checkpointing import Checkpointing, RunIdentity, Snapshots
from .control import ControlPoller, start_status_server
from .core.contract import TrainerEnv
from .core.layout import CheckpointInfo, config_fingerprint, split_checkpoint_uri
from .core.storage import Storage, open_storage
from .determinism import EXACT, Exactness
from .finish import EXIT_RESERVE_SECONDS, Finisher, RunResult, StandbyEnded
from .peers import Peers, SoloPeers
from .core.heartbeat import (ACTIVITY_FINISHING, ACTIVITY_REJOINING, ACTIVITY_RESTORING,
                             ACTIVITY_STANDBY, ACTIVITY_TRAINING)
from .policies import CheckpointPolicy, ReportingPolicy, take_legacy_keywords
from .progress import Progress
from .rejoin import ENV_SPARE_WAITED, STOPPED, SUPERSEDED, rejoin_record
from .restore import Loader, LocalLoader, Restored, Restorer
from .standby import STANDBY_PREFETCH_SECONDS, Standby
from .stopping import HANDOFF_SAVE_LIMIT_SECONDS, HANDOFF_SIGNAL, StopRequest

__all__ = [
    "Session", "Restored", "RunResult", "StandbyEnded", "split_state", "TRAINER_DOC",
    "EXIT_RESERVE_SECONDS", "HANDOFF_SIGNAL", "HANDOFF_SAVE_LIMIT_SECONDS",
    "STANDBY_PREFETCH_SECONDS", "PROCESS_PREFETCH",
]

log = logging.getLogger("phoenix.trainer")

# ``Session(prefetch=...)``'s default: the download this process started at interpreter start
# (prefetch.start_from_env), handed over to the session's restore.
PROCESS_PREFETCH: Any = object()


class _Ctx(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['ctx']}] {msg}", kwargs


class Session:
    """One training process's Phoenix session; see the module docstring.

    ``checkpoint`` / ``reporting``: the policies (policies.py). ``prefetch``: the start-up
    download to take shards from (default: this process's, if it started one). ``peers``,
    ``snapshots``, ``commit``, ``loader``: the parts a process group supplies."""

    def __init__(
        self, *, config: Mapping[str, Any] | None = None, env: TrainerEnv | None = None,
        storage: Storage | None = None, checkpoint: CheckpointPolicy | None = None,
        reporting: ReportingPolicy | None = None, install_signal_handlers: bool = True,
        clock: Callable[[], float] = time.monotonic, exactness: Exactness = EXACT,
        prefetch: Any = PROCESS_PREFETCH, peers: Peers | None = None,
        snapshots: Snapshots | None = None, commit: Callable[..., CheckpointInfo] | None = None,
        loader: Loader | None = None, state: Callable[[], Mapping[str, Any]] | None = None,
        peer_state: Any = None, rejoin: Any = None, **legacy: Any,
    ) -> None:
        policies = take_legacy_keywords("Session", legacy, {"checkpoint": checkpoint, "reporting": reporting})
        # Where a start-up's seconds go (the start record's ``startup``): the process's own
        # start, this session's creation (the script's imports and model build come before
        # it), a standby's wait, the restore.
        self._startup: dict[str, float] = {"session": time.time()}
        self.env = env or TrainerEnv.from_env()
        self.storage = storage
        if self.storage is None and self.env.checkpoint_uri:
            self.storage = open_storage(self.env.checkpoint_uri)
        elif self.storage is None and self.env.resume_from:
            # No prefix of our own: keep checkpointing where the resume target lives.
            self.storage = open_storage(split_checkpoint_uri(self.env.resume_from)[0])
        self.clock = clock
        self.peers: Peers = peers or SoloPeers()
        self.log = _Ctx(log, {"ctx": self.peers.describe(self.env.log_context)})
        cfg = dict(config or {})
        self.run = RunIdentity(cfg, config_fingerprint(cfg), self.env.phase, uuid.uuid4().hex[:12],
                               exactness=exactness)
        self.stop = StopRequest(clock, self.log)
        self.checkpointing = Checkpointing(
            env=self.env, storage=self.storage, run=self.run, policy=policies["checkpoint"],
            metrics_interval_seconds=policies["reporting"].metrics_interval_seconds, clock=clock,
            log=self.log, snapshots=snapshots, commit=commit, leads=self.peers.leads)
        self.restorer = Restorer(
            env=self.env, storage=self.storage, run=self.run, peers=self.peers,
            loader=loader or LocalLoader(), log=self.log, retry=policies["checkpoint"].retry,
            prefetch=prefetch_mod.adopt() if prefetch is PROCESS_PREFETCH else prefetch)
        self.finisher = Finisher(
            env=self.env, storage=self.storage, run=self.run, checkpointing=self.checkpointing,
            stop=self.stop, peers=self.peers, emergency=policies["checkpoint"].emergency,
            clock=clock, log=self.log)
        self.standby = Standby(env=self.env, storage=self.storage, restorer=self.restorer,
                               stop=self.stop, clock=clock, log=self.log, mark_ready=self._mark_ready,
                               end=self.finisher.end_standby)
        self.control: ControlPoller | None = None
        self.progress = Progress(self.storage, rank=self.peers.rank, log_=self.log)
        self.status_server = start_status_server(self.env.status_port) if self.peers.leads_pod else None
        self.restore_started = False
        self.last_step = 0  # the newest step boundary the loop told us about
        # The loop's state at a step boundary (what ``save`` takes): an in-place gang keeps it
        # in its peers' memory every step (rejoin.PeerState) and survives losing a member.
        self.state_fn = state
        self.peer_state = peer_state
        self.rejoin = rejoin
        if rejoin is not None:
            rejoin.storage = self.storage
        self.restored_from = "none"  # "peers" | "checkpoint" | "none": where restore() got it
        if install_signal_handlers:
            self.install_signal_handler()

    # ------------------------------------------------------------------ the run ----------
    # What the parts know, under the names scripts and tests have used.
    config = property(lambda self: self.run.config)
    fingerprint = property(lambda self: self.run.fingerprint)
    run_id = property(lambda self: self.run.run_id)
    attempt = property(lambda self: self.run.attempt)
    resumed_from = property(lambda self: self.run.resumed_from)
    checkpointer = property(lambda self: self.checkpointing.checkpointer)
    metrics = property(lambda self: self.checkpointing.metrics)
    after_commit = property(lambda self: self.checkpointing.after_commit)
    interval_steps = property(lambda self: self.checkpointing.interval_steps)
    interval_seconds = property(lambda self: self.checkpointing.interval_seconds)
    latest = property(lambda self: self.checkpointing.latest,
                      doc="The newest checkpoint this process committed, else the one it resumed from.")
    result = property(lambda self: self.finisher.result)

    @property
    def exactness(self) -> Exactness:
        return self.run.exactness

    @exactness.setter
    def exactness(self, value: Exactness) -> None:
        self.run.exactness = value

    # ------------------------------------------------------------------ signals ----------
    def install_signal_handler(self) -> None:
        """SIGTERM -> ``request_stop`` (main thread only; ``close`` puts the old one back)."""
        self.stop.install(self.request_stop)

    def request_stop(self, signum: int = signal.SIGTERM, label: str = "") -> None:
        """Ask the loop to stop at its next step boundary (what the SIGTERM handler does)."""
        self.stop.request(signum, label)

    @property
    def stop_requested(self) -> bool:
        return self.stop.requested

    def should_stop(self, step: int) -> bool:
        """Stop at this step boundary? (In a gang: does any rank want to; all agree.)"""
        return self._agree(step)[0]

    def should_checkpoint(self, step: int) -> bool:
        """A periodic checkpoint is due at this step boundary (interval in steps or seconds,
        or the operator asked; in a gang: due on any rank)."""
        return self._agree(step)[1]

    def _agree(self, step: int) -> tuple[bool, ...]:
        self.last_step = step
        self.progress.step(step)
        # An in-place gang also agrees whether some ranks go on and whether any cannot let a
        # member leave alone (the same number of flags on every rank: the mode is the pod's).
        stop, due, *more = self.peers.agree(step, lambda: (
            self.stop_requested, self.checkpointing.due(step))
            + ((not self.stop_requested, not self._may_leave()) if self.rejoin is not None else ()))
        leave = stop and bool(more) and more[0] and not more[1]  # some ranks stop, others go on
        if stop and not leave and not self.stop_requested:
            self.log.info("a peer rank was asked to stop; stopping at step %d with it", step)
            self.request_stop()
        if (not stop or leave) and self.peer_state is not None and self.state_fn is not None:
            run = self.run
            self.peer_state.snapshot(step, self.state_fn, {
                "configFingerprint": run.fingerprint, "phase": self.env.phase, "runId": run.run_id,
                "attempt": run.attempt, "epoch": 0})
        if leave:
            if self.stop_requested:
                self.finisher.end_standby(
                    f"{self.stop.label or 'stop'} at step {step}: this member leaves the gang; its"
                    " peers keep training and hand its replacement their state (no checkpoint"
                    " needed, 0 steps lost)")
            self.log.info("a member leaves the gang at step %d (it was asked to stop); going on"
                          " without it until its replacement joins", step)
            return False, due
        return stop, due

    def _may_leave(self) -> bool:
        """An in-place gang whose replicated state its peers hold (a peer snapshot was taken):
        a member asked to stop (its pod evicted) leaves alone instead of stopping everyone."""
        ps = self.peer_state
        return (ps is not None and not ps.disabled and ps.last_step is not None
                and self.state_fn is not None)

    # ------------------------------------------------------------------ restore ----------
    def restore(self) -> Restored | None:
        """Load the newest valid checkpoint of this phase (or ``PHOENIX_RESUME_FROM``'s),
        else the previous phase's weights (``PHOENIX_INIT_FROM``), else None. Opens the
        asynchronous checkpointer and starts the metrics log; call it once, before training."""
        if self.restore_started:
            raise RuntimeError("Session.restore() was already called")
        self.restore_started = True
        began = time.time()
        run, env = self.run, self.env
        if self.storage is not None:
            run.attempt = env.attempt if env.attempt is not None else next_attempt(self.storage)
        else:
            run.attempt = env.attempt or 0
        target = env.resume_from
        self.progress.start(run.attempt, ACTIVITY_STANDBY if env.standby else ACTIVITY_RESTORING)
        if env.standby:
            target = self.standby.wait(run.attempt)
            self.peers.barrier()  # a gang restores together once every rank is promoted
            self.progress.set_activity(ACTIVITY_RESTORING)
            self._startup["standby"] = time.time() - began
            began = time.time()
        restored = None
        if self.peer_state is not None:  # an in-place gang's survivors hold the newest step
            restored = self.peer_state.restore(fingerprint=run.fingerprint, phase=env.phase,
                                               resume_from=target)
            if restored is not None:
                self.restored_from = "peers"
                run.run_id = str((restored.get(TRAINER_DOC) or {}).get("runId") or run.run_id)
        if restored is None:
            restored = self.restorer.find_own(target) if self.storage is not None else None
            if restored is None:
                restored = self.restorer.init_from()
            else:
                self.restored_from = "checkpoint"
                run.resumed_from = restored.info
                run.run_id = str((restored.get(TRAINER_DOC) or {}).get("runId") or run.run_id)
        self.progress.restored(self.restored_from, restored.step if restored is not None and
                               restored.kind == "resume" else None)
        self.checkpointing.open()
        self.restorer.warm = None
        self._start_control()
        self._mark_ready()
        self._startup["restore"] = time.time() - began
        self.restorer.end_prefetch()
        self.progress.set_activity(ACTIVITY_TRAINING)
        return restored

    def _start_control(self) -> None:
        """The operator's requests (control.json): read by the run's leader; the flags reach
        the other processes through ``should_stop`` / ``should_checkpoint``."""
        if self.storage is None or self.env.attempt is None or not self.peers.leads:
            return
        self.control = ControlPoller(self.storage, self.attempt, self.env.control_poll_seconds,
                                     on_checkpoint=self.checkpointing.request_now,
                                     on_handoff=self.stop.hand_off, uid=self.env.job_uid).start()

    def _mark_ready(self) -> None:
        if self.status_server is not None:
            self.status_server.ready.set()

    def startup(self) -> dict[str, Any]:
        """Seconds of this process's start-up so far: ``beforeSession`` (interpreter, imports,
        model build: the script's part), ``standbyWait`` (a standby's wait for promotion),
        ``spareWait`` (a spare's wait for a member's place, within ``beforeSession``),
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
        spare = os.environ.get(ENV_SPARE_WAITED)
        if spare:  # part of beforeSession: it waited in init_from_env, before the session
            out["spareWait"] = float(spare)
        if "restore" in self._startup:
            out["restore"] = round(self._startup["restore"], 3)
        if self.restorer.prefetched is not None:
            out["prefetch"] = self.restorer.prefetched
        return out

    def started(self, step: int, epoch: int = 0, **fields: Any) -> None:
        """Record the start (or resume) in the log and the metrics; call after loading."""
        startup = self.startup()
        resumed = self.resumed_from is not None or self.restored_from == "peers"
        rejoin = rejoin_record()
        if rejoin:
            fields = {**fields, "rejoin": rejoin}
        if self.metrics:
            written_by = (self.resumed_from.manifest.attempt
                          if self.resumed_from and self.resumed_from.manifest else None)
            self.metrics.emit("resume" if resumed else "start", step=step, epoch=epoch,
                              checkpoint=self.resumed_from.uri if self.resumed_from else None,
                              checkpointAttempt=written_by,
                              restoredFrom=self.restored_from,
                              configFingerprint=self.fingerprint, resumeExact=self.exactness.exact,
                              resumeExactReason=self.exactness.reason, startup=startup, **fields)
        if not self.exactness.exact:
            self.log.warning("a resume of this run will not be bit-exact: %s", self.exactness.reason)
        # The pid shows whether the trainer is its container's PID 1 (it must be, or a shell
        # in front of it swallows the kubelet's SIGTERM).
        self.log.info("%s run %s attempt %d at step %d (epoch %d), config %s, restored from %s,"
                      " pid %d%s%s", "resuming" if resumed else "starting", self.run_id,
                      self.attempt, step, epoch, self.fingerprint, self.restored_from, os.getpid(),
                      _describe_startup(startup),
                      f", rejoined {rejoin['secondsSinceLoss']:.2f}s after the loss in attempt"
                      f" {rejoin['fromAttempt']} ({rejoin['how']})" if rejoin else "")

    # ------------------------------------------------------------------ saving -----------
    def snapshot(self, step: int, epoch: int, state: Mapping[str, Any],
                 progress: Mapping[str, Any] | None = None,
                 defer: Callable[[Any], bool] | None = None) -> Snapshot:
        """A CPU copy of ``state`` plus ``trainer.json``: the only part of a save that blocks.
        The tensors ``defer`` picks may still be copying when it returns: ``Snapshot.settle``
        before anything writes them."""
        return self.checkpointing.snapshot(step, epoch, state, progress, defer)

    def save(self, step: int, state: Mapping[str, Any] | Snapshot, *, epoch: int = 0,
             progress: Mapping[str, Any] | None = None, blocking: bool = False) -> Future | None:
        """Checkpoint ``state`` (or a snapshot already taken) as ``step-N``, in the background."""
        self.last_step = step
        return self.checkpointing.save(step, state, epoch=epoch, progress=progress, blocking=blocking)

    def emit(self, event: str, **fields: Any) -> None:
        """A metrics record (``metrics/attempt-N.jsonl``); uploaded now and then, off the loop."""
        self.checkpointing.emit(event, **fields)

    def has_checkpoint_at(self, step: int) -> bool:
        return self.checkpointing.has_checkpoint_at(step)

    # ------------------------------------------------------------------ the end ----------
    def finish(self, reason: str, step: int, *, epoch: int = 0,
               state: Mapping[str, Any] | Snapshot | Callable[[], Mapping[str, Any] | Snapshot] | None = None,
               progress: Mapping[str, Any] | None = None, train_seconds: float = 0.0) -> RunResult:
        """End the run: "completed" saves a final checkpoint of ``step`` if none exists;
        "preempted" saves an emergency checkpoint if the grace period allows it. Writes the
        termination message and returns the result (``exit_code`` for ``sys.exit``).

        ``state`` may be a callable so that a stop too close to the grace deadline does not
        even pay for building it; its size is what the time estimate is made from."""
        self.progress.set_activity(ACTIVITY_FINISHING)
        return self.finisher.finish(reason, step, epoch=epoch, state=state, progress=progress,
                                    train_seconds=train_seconds)

    def fail(self, error: BaseException, step: int, *, epoch: int = 0,
             train_seconds: float = 0.0) -> RunResult:
        """End the run as failed (exit 1): finished uploads stay as fallbacks."""
        self.progress.set_activity(ACTIVITY_FINISHING)
        return self.finisher.fail(error, step, epoch=epoch, train_seconds=train_seconds)

    def close(self) -> None:
        """Put the SIGTERM handler back and stop the upload thread (after a stop, at once)."""
        self.stop.uninstall()
        if self.control is not None:
            self.control.stop()
        if self.status_server is not None:
            # Answer the readiness probe until the process exits (atexit): closed now, the
            # probe fails while the container writes its termination message and exits, and
            # every clean end leaves "Unhealthy" warnings in the job's events.
            self.status_server.close_at_exit()
        # After a preemption we already spent what the grace period allowed.
        self.checkpointing.close(timeout=0 if self.stop_requested else None)
        self.restorer.close()
        self.progress.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None and self.result is None and not isinstance(exc, SystemExit):
                if self.rejoin is not None and self.rejoin.applies(exc):
                    self._rejoin(exc)  # re-execs into the next attempt, or ends the process
                self.fail(exc, step=self.last_step)
        finally:
            self.close()

    def _rejoin(self, exc: BaseException) -> None:
        """An in-place gang lost a peer: wait for the attempt that carries this pod and re-exec
        into it (rejoin.Rejoin); superseded or stopped meanwhile: exit as preempted; no
        fence in time: return (the caller fails the run with the original error)."""
        self.progress.set_activity(ACTIVITY_REJOINING)
        outcome, fence = self.rejoin.wait(exc, lambda: self.stop_requested)
        if outcome == SUPERSEDED:
            self.finisher.end_standby(
                f"attempt {self.attempt} lost a peer at step {self.last_step} and was superseded"
                f" by attempt {fence.attempt if fence else '?'}, which does not carry pod"
                f" {self.rejoin.me.pod or '?'}")
        if outcome == STOPPED:
            self.finisher.end_standby(
                f"stopped ({self.stop.label or 'SIGTERM'}) while waiting to rejoin after a peer was"
                f" lost at step {self.last_step}; resuming from the newest checkpoint")
        self.log.error("no attempt carried pod %s within %.0fs of losing a peer",
                       self.rejoin.me.pod or "?", self.rejoin.timeout)


def _describe_startup(startup: Mapping[str, Any]) -> str:
    """", up 3.1s (2.8s before the session, restore 0.12s)" for the start log line."""
    if "total" not in startup:
        return ""
    parts = [f"{startup['beforeSession']:.1f}s before the session"]
    if "standbyWait" in startup:
        parts.append(f"{startup['standbyWait']:.1f}s as a standby")
    if "spareWait" in startup:
        parts.append(f"of which {startup['spareWait']:.1f}s as a spare")
    if "restore" in startup:
        parts.append(f"restore {startup['restore']:.2f}s")
    return f", up {startup['total']:.1f}s ({', '.join(parts)})"
