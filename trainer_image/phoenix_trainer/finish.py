"""How a session ends: the final or emergency checkpoint, the handoff, the termination
message the operator reads, and the exit code.

``Finisher`` ends a run as completed (a final checkpoint of the last step if none exists),
preempted (an emergency checkpoint if the grace period allows it, made by every process of a
gang or by none; after a handoff request, the fence for the standby) or failed. Only the
process that leads its pod writes the termination message (``peers.leads_pod``).

Never runs in a signal handler, never raises out of a failure report (the original error
matters more), never logs credentials.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn

from .checkpoint import Snapshot, split_state
from .checkpointing import Checkpointing, RunIdentity
from .core.contract import (
    EXIT_COMPLETED,
    EXIT_FAILED,
    EXIT_PREEMPTED,
    REASON_COMPLETED,
    REASON_FAILED,
    REASON_PREEMPTED,
    TerminationMessage,
    TrainerEnv,
)
from .core.errors import CheckpointError, StorageError, SupersededError
from .core.handshake import FENCE_NAME, Fence, advance_fence
from .core.storage import Storage
from .determinism import Exactness
from .peers import Peers
from .policies import FINAL_SAVE_RETRY
from .stopping import HANDOFF_SAVE_LIMIT_SECONDS, StopRequest
from .tensors import tree_nbytes

# Time kept back from the grace period for writing the termination message and exiting.
EXIT_RESERVE_SECONDS = 1.0


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


def write_handoff_fence(storage: Storage, env: TrainerEnv, attempt: int, pod: str,
                        resume_from: str) -> None:
    """Fence the phase for standby ``attempt`` naming ``resume_from``, unless a fence for it
    (or a later attempt) is there already (``core.handshake.advance_fence``, the one writer)."""
    advance_fence(storage, Fence(
        attempt, pod, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        resume_from=resume_from, uid=env.job_uid,
        job=f"{env.job_namespace}/{env.job_name}" if env.job_name else ""))


class Finisher:
    """The end of one session; see the module docstring."""

    def __init__(self, *, env: TrainerEnv, storage: Storage | None, run: RunIdentity,
                 checkpointing: Checkpointing, stop: StopRequest, peers: Peers, emergency: bool,
                 clock: Callable[[], float], log: logging.LoggerAdapter) -> None:
        self.env, self.storage, self.run, self.checkpointing = env, storage, run, checkpointing
        self.stop, self.peers, self.emergency, self.clock, self.log = stop, peers, emergency, clock, log
        self.result: RunResult | None = None
        self._since: float | None = None  # when the grace period began (_emergency_save)

    def finish(self, reason: str, step: int, *, epoch: int = 0, state: Any = None,
               progress: Mapping[str, Any] | None = None, train_seconds: float = 0.0) -> RunResult:
        if reason not in (REASON_COMPLETED, REASON_PREEMPTED):
            raise ValueError(f"finish(reason={reason!r}): use 'completed' or 'preempted' (or fail())")
        ckpt = self.checkpointing
        saved, message = False, ""
        if reason == REASON_COMPLETED:
            if ckpt.checkpointer is not None:
                ckpt.checkpointer.wait()
                if not ckpt.has_checkpoint_at(step) and state is not None:
                    error = self._final_save(step, epoch, state, progress)
                    if error is not None and not isinstance(error, SupersededError):
                        # The weights are newer than every checkpoint: a failure, so that the
                        # next attempt trains the rest again and saves it, instead of a
                        # Succeeded job whose result is an older step.
                        return self.fail(CheckpointError(
                            f"final checkpoint at step {step} failed: {error}"), step,
                            epoch=epoch, train_seconds=train_seconds)
                    if error is not None:
                        message = f"final checkpoint at step {step} not written: {error}"
                saved = ckpt.has_checkpoint_at(step)
            message = message or f"training completed at step {step}"
            exit_code = EXIT_COMPLETED
        else:
            saved, message = self._emergency_save(step, epoch, state, progress)
            if self.stop.handoff is not None and saved:
                message += self._hand_off()
            exit_code = EXIT_PREEMPTED
        latest = ckpt.latest
        result = RunResult(reason, step, epoch, latest.uri if latest else None, saved, message,
                           exit_code, train_seconds, self.run.exactness)
        self._end(result)
        return result

    def _final_save(self, step: int, epoch: int, state: Any,
                    progress: Mapping[str, Any] | None) -> Exception | None:
        """Save a completed run's final checkpoint; the last error if it could not be.

        Nothing else is left for the run to do, so a save that failed on storage is tried
        again as a whole (``CheckpointPolicy.final_retry``: minutes, an S3 outage is waited
        out); any other error (a newer attempt owns the phase, a state that cannot be saved)
        is returned at once. A count of tries, not a deadline: every process of a gang hears
        the same outcome of each try (``GangCommit`` raises the same kind on every rank), so
        all of them try the same number of times and none is left alone in a collective."""
        retry = self.checkpointing.policy.final_retry or FINAL_SAVE_RETRY
        tries = max(1, retry.attempts)
        for failure in range(tries):
            try:
                self.checkpointing.save(step, _resolve(state), epoch=epoch, progress=progress,
                                        blocking=True)
                return None
            except Exception as e:  # noqa: BLE001 - reported; the run ends either way
                if not isinstance(e, (StorageError, OSError)) or failure == tries - 1:
                    return e
                delay = retry.delay(failure)
                self.log.warning("final checkpoint at step %d failed (%s); try %d of %d in %.0fs",
                                 step, e, failure + 2, tries, delay)
                retry.sleep(delay)
        raise AssertionError("unreachable")

    def _emergency_save(self, step: int, epoch: int, state: Any,
                        progress: Mapping[str, Any] | None) -> tuple[bool, str]:
        ckpt, sig = self.checkpointing, self.stop.label or "stop"
        # The grace period counts from the stop request (or from now, if there was none).
        self._since = self.stop.since if self.stop.since is not None else self.clock()
        checkpointer = ckpt.checkpointer
        if checkpointer is None:
            return False, f"{sig} at step {step}; no checkpoint storage configured, progress is lost"
        if step in checkpointer.pending_steps() or ckpt.has_checkpoint_at(step):
            checkpointer.wait(timeout=max(0.0, self._remaining()))
            if ckpt.has_checkpoint_at(step):
                return True, f"{sig} at step {step}; a checkpoint of this step already existed (0 steps lost)"
        verdict, need, state = self._verdict(sig, step, state)
        if not self.peers.all(verdict is None):  # a gang saves together or not at all
            return False, verdict or (f"{sig} at step {step}; a peer rank could not save within"
                                      f" its grace period; resuming from {self._resume_point(step)[0]}")
        t0 = time.perf_counter()
        try:
            ckpt.save(step, state, epoch=epoch, progress=progress, blocking=True)
        except Exception as e:  # noqa: BLE001 - report in the termination message instead
            return False, f"{sig} at step {step}; emergency checkpoint failed: {e}"
        return True, (f"{sig} at step {step}; emergency checkpoint saved in"
                      f" {time.perf_counter() - t0:.1f}s (estimated {need:.1f}s, 0 steps lost)")

    def _verdict(self, sig: str, step: int, state: Any) -> tuple[str | None, float, Any]:
        """Why this process cannot save now (None: it can), the seconds a save would need,
        and the state (built now if it was a callable)."""
        checkpointer = self.checkpointing.checkpointer
        assert checkpointer is not None
        if not self.emergency or state is None:
            checkpointer.wait(timeout=max(0.0, self._remaining()))  # periodic saves still finish
            why = "emergency checkpoints are disabled" if not self.emergency else "no state given"
            return f"{sig} at step {step}; {why}, resuming from {self._resume_point(step)[0]}", 0.0, state
        state = _resolve(state)
        nbytes = state.nbytes if isinstance(state, Snapshot) else tree_nbytes(split_state(state)[0])
        need = checkpointer.estimate_save_seconds(nbytes)
        # Earlier uploads go first (one upload thread); let them use what time there is.
        flushed = checkpointer.wait(timeout=max(0.0, self._remaining()))
        left, grace = self._remaining(), self._grace()
        last, lost = self._resume_point(step)
        if need > left:
            return (f"{sig} at step {step}; grace period too short for an emergency"
                    f" checkpoint (need ~{need:.1f}s, {max(0.0, left):.1f}s left of {grace:.0f}s);"
                    f" resuming from {last} loses {lost} steps"), need, state
        if not flushed:
            return (f"{sig} at step {step}; earlier uploads did not finish within the"
                    f" {grace:.0f}s grace period, no emergency checkpoint; resuming from"
                    f" {last} loses {lost} steps"), need, state
        return None, need, state

    def _grace(self) -> float:
        if self.stop.is_handoff:
            # The operator asked for a handoff; nothing is killing this pod: the final
            # checkpoint is made whatever the SIGTERM grace would allow. (Should the reclaim
            # come meanwhile, the kubelet's SIGKILL may cut the save short: a partial
            # checkpoint has no manifest and is never resumed from.)
            return HANDOFF_SAVE_LIMIT_SECONDS
        return self.env.grace_seconds

    def _remaining(self) -> float:
        """Seconds left of the grace period (from the stop request), less the exit reserve."""
        assert self._since is not None
        return self._grace() - (self.clock() - self._since) - EXIT_RESERVE_SECONDS

    def _resume_point(self, step: int) -> tuple[str, int]:
        """Where the next attempt resumes and how many steps that loses."""
        latest = self.checkpointing.latest
        return (latest.uri if latest else "scratch"), step - (latest.step if latest else 0)

    def _hand_off(self) -> str:
        """After the final checkpoint: fence the phase for the standby, naming that checkpoint,
        so it starts at once (the operator would, too, once it sees this pod end)."""
        latest = self.checkpointing.latest
        assert self.stop.handoff is not None and self.storage is not None and latest is not None
        attempt, pod = self.stop.handoff
        try:
            write_handoff_fence(self.storage, self.env, attempt, pod, latest.uri)
        except Exception as e:  # noqa: BLE001 - the operator promotes the standby anyway
            self.log.warning("handoff: cannot write %s (%s: %s); the operator will promote"
                             " attempt %d when this pod ends", FENCE_NAME, type(e).__name__, e,
                             attempt)
            return f"; handoff fence not written ({type(e).__name__})"
        self.log.info("handed off to attempt %d at %s", attempt, latest.uri)
        return f"; handed off to attempt {attempt}"

    def fail(self, error: BaseException, step: int, *, epoch: int = 0,
             train_seconds: float = 0.0) -> RunResult:
        msg = f"{type(error).__name__}: {error}"
        if self.checkpointing.checkpointer is not None:
            self.checkpointing.checkpointer.wait(timeout=10)
        latest = self.checkpointing.latest
        result = RunResult(REASON_FAILED, step, epoch, latest.uri if latest else None, False, msg,
                           EXIT_FAILED, train_seconds, self.run.exactness)
        try:
            self._end(result)
        except Exception:  # noqa: BLE001 - the original error matters more
            self.log.exception("while reporting failure")
        return result

    def _end(self, result: RunResult) -> None:
        self.result = result
        if not self.peers.leads_pod:  # one termination message per pod: its leader writes it
            self.log.info("%s at step %d: %s", result.reason, result.step, result.message)
            return
        self.log.info("%s at step %d: %s (checkpoint %s, exit %d, train %.1fs)", result.reason,
                      result.step, result.message, result.checkpoint, result.exit_code,
                      result.train_seconds)
        # The termination message first: it is what the operator reads, and the metrics upload
        # below is synchronous; with S3 unreachable it can outlast the grace period and the
        # kubelet's SIGKILL would otherwise lose the emergency-save result.
        result.termination_message().write(self.env.termination_log)
        metrics = self.checkpointing.metrics
        if metrics:
            metrics.emit("end", reason=result.reason, step=result.step, epoch=result.epoch,
                         checkpoint=result.checkpoint, trainSeconds=round(result.train_seconds, 3),
                         emergencySaveCompleted=result.emergency_save_completed,
                         message=result.message)
            metrics.upload()

    def end_standby(self, why: str) -> NoReturn:
        """A standby that will never be promoted: the termination message, exit as preempted."""
        self.log.info("%s", why)
        self.result = RunResult(REASON_PREEMPTED, 0, 0, None, False, why, EXIT_PREEMPTED, 0.0,
                                self.run.exactness)
        if self.peers.leads_pod:
            self.result.termination_message().write(self.env.termination_log)
        raise StandbyEnded(EXIT_PREEMPTED)


def _resolve(state: Any) -> Any:
    return state() if callable(state) else state
