"""The trainer runtime's exception hierarchy.

Small on purpose: callers catch by kind (is this a storage problem? a corrupt checkpoint? a
transient error worth retrying?). No torch import here: the operator imports storage code
that raises these.
"""
from __future__ import annotations


class PhoenixTrainerError(Exception):
    """Base class for every error the trainer runtime raises on purpose."""


class StorageError(PhoenixTrainerError):
    """Object storage could not be reached or refused an operation (usually transient)."""


class ObjectMismatchError(PhoenixTrainerError):
    """A stored object is not the size a reader was told to expect (it was replaced, cut
    short or grew): reading it again will not help, unlike a ``StorageError``."""

    def __init__(self, uri: str, size: int | None, expected: int) -> None:
        super().__init__(f"{uri} has {size} bytes, {expected} were expected")
        self.uri, self.size, self.expected = uri, size, expected


class CheckpointError(PhoenixTrainerError):
    """A checkpoint cannot be written, found or used."""


class SpoolFullError(CheckpointError):
    """A checkpoint's files would not fit in the local spool (``PHOENIX_SPOOL_LIMIT_MB`` or
    the free space); refused before writing instead of getting the pod evicted."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint exists but fails validation (missing/corrupt manifest, size, sha256)."""


class NoCheckpointError(CheckpointError):
    """No valid checkpoint where one was required."""


class ConfigMismatchError(CheckpointError):
    """The checkpoint was made with a different config fingerprint."""


class SupersededError(CheckpointError):
    """A newer attempt of this phase has started (the operator's fence object says so): this
    attempt must not publish or delete checkpoints any more."""


class StaleLeaderError(PhoenixTrainerError):
    """An operator replica that no longer leads tried to write the fence or control document
    over one a newer leader wrote (``core.handshake.LeaderTerm``): refused."""


class TransientError(PhoenixTrainerError):
    """Raise (or subclass) this for failures that a retry from the last good state can fix."""


class StageError(PhoenixTrainerError):
    """An exception escaped a Stage; carries the stage name and the step it happened at."""

    def __init__(self, stage: str, step: int | None, cause: BaseException) -> None:
        super().__init__(stage, step, cause)
        self.stage = stage
        self.step = step  # filled in by the training loop, which knows the step
        self.cause = cause

    def __str__(self) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        return f"stage {self.stage!r} failed{where}: {type(self.cause).__name__}: {self.cause}"


class RecoveryExhaustedError(PhoenixTrainerError):
    """In-process recovery gave up after its bounded number of retries."""
