"""How a run checkpoints, recovers, steps through its data and reports: typed policy objects.

``Trainer`` (and ``Session``, for the checkpoint and reporting parts) is configured with a
few of these instead of two dozen keyword arguments; each field's comment says what it does.
The keywords they replace keep working for one release: ``LEGACY_KEYWORDS`` is the one table
mapping each old keyword to its policy field, and ``take_legacy_keywords`` applies it (with a
``DeprecationWarning`` naming the replacement).

Plain data only: no torch import, no I/O, no clock reads; nothing here decides anything.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .core.errors import TransientError
from .core.writer import RetryPolicy


# "reload": back to the last good in-memory state; "reinit_epoch": restart the epoch.
RESTART_METHODS = ("reload", "reinit_epoch")


def check_restart_method(method: str) -> None:
    if method not in RESTART_METHODS:
        raise ValueError(f"restart_method={method!r}; use one of {RESTART_METHODS}")


# The default ``CheckpointPolicy.final_retry``: backoff from 2 s up to 30 s between tries.
FINAL_SAVE_RETRY = RetryPolicy(attempts=12, initial_seconds=2.0, max_seconds=30.0)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When and how checkpoints are written."""

    interval_steps: int | None = None  # periodic checkpoint every N steps (None: the env's)
    interval_seconds: float | None = None  # ... or every N seconds (None: the env's)
    max_in_flight: int = 1  # saves uploading at once before save() waits for the oldest
    retry: RetryPolicy | None = None  # per-upload retries (None: writer's default)
    # A completed run's final checkpoint, tried again as a whole after a failed save (None:
    # FINAL_SAVE_RETRY, 12 tries over 2-4 minutes: a storage outage is waited out, not lost).
    final_retry: RetryPolicy | None = None
    emergency: bool = True  # save on SIGTERM if the grace period allows (off: benchmarks only)
    # ``Trainer`` only: a periodic checkpoint's parameters and optimizer state (CPU tensors,
    # 16 MB or more) finish copying on the snapshot threads while the next step's forward
    # and backward run; saved before its optimizer step writes them (docs/trainer.md).
    overlap_snapshot: bool = True
    init_strict: bool = True  # PHOENIX_INIT_FROM weights must match the model's keys exactly


@dataclass(frozen=True)
class RecoveryPolicy:
    """In-process recovery from transient step failures (``Trainer`` only)."""

    restart_method: str = "reload"  # one of RESTART_METHODS
    max_retries: int = 3  # consecutive failures before RecoveryExhaustedError
    retry_on: Sequence[type[BaseException]] = (TransientError,)  # errors treated as transient
    snapshot_interval_steps: int | None = None  # in-memory "last good" snapshot (None: ckpt interval or 50)

    def __post_init__(self) -> None:
        check_restart_method(self.restart_method)


@dataclass(frozen=True)
class DataPolicy:
    """How the loop consumes its loader (``Trainer`` only)."""

    accumulate_grad_batches: int = 1  # micro-batches per optimizer step


@dataclass(frozen=True)
class ReportingPolicy:
    """Progress logs and metrics uploads."""

    log_every: int = 50  # a progress log line (and a "step" metrics record) every N steps
    metrics_interval_seconds: float = 30.0  # upload metrics/attempt-N.jsonl at most this often


# old keyword -> (the argument that replaces it, its policy class, the field)
LEGACY_KEYWORDS: Mapping[str, tuple[str, type, str]] = {
    "checkpoint_interval_steps": ("checkpoint", CheckpointPolicy, "interval_steps"),
    "checkpoint_interval_seconds": ("checkpoint", CheckpointPolicy, "interval_seconds"),
    "max_in_flight": ("checkpoint", CheckpointPolicy, "max_in_flight"),
    "retry_policy": ("checkpoint", CheckpointPolicy, "retry"),
    "emergency_checkpoint": ("checkpoint", CheckpointPolicy, "emergency"),
    "init_strict": ("checkpoint", CheckpointPolicy, "init_strict"),
    "restart_method": ("recovery", RecoveryPolicy, "restart_method"),
    "max_retries": ("recovery", RecoveryPolicy, "max_retries"),
    "retry_on": ("recovery", RecoveryPolicy, "retry_on"),
    "snapshot_interval_steps": ("recovery", RecoveryPolicy, "snapshot_interval_steps"),
    "accumulate_grad_batches": ("data", DataPolicy, "accumulate_grad_batches"),
    "log_every": ("reporting", ReportingPolicy, "log_every"),
    "metrics_interval_seconds": ("reporting", ReportingPolicy, "metrics_interval_seconds"),
}


def take_legacy_keywords(owner: str, legacy: Mapping[str, Any],
                         policies: Mapping[str, Any]) -> dict[str, Any]:
    """``policies`` (argument name -> policy or None) with the old keywords in ``legacy``
    applied, each with a DeprecationWarning; a policy left None becomes its default. A policy
    given explicitly wins over old keywords for it (``StagedModule.fit`` passes its own
    ``restart_method`` and ``max_retries`` as defaults). An unknown keyword is a TypeError."""
    out = dict(policies)
    changes: dict[str, dict[str, Any]] = {}
    for key, value in legacy.items():
        if key not in LEGACY_KEYWORDS or LEGACY_KEYWORDS[key][0] not in policies:
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}")
        arg, cls, name = LEGACY_KEYWORDS[key]
        ignored = f"; ignored, {arg}= was given" if policies[arg] is not None else ""
        warnings.warn(f"{owner}({key}=...) is deprecated and will be removed in the next release;"
                      f" use {owner}({arg}={cls.__name__}({name}=...)){ignored}",
                      DeprecationWarning, stacklevel=3)
        changes.setdefault(arg, {})[name] = value
    for arg in policies:
        if out[arg] is None:
            cls = next(c for a, c, _ in LEGACY_KEYWORDS.values() if a == arg)
            out[arg] = cls(**changes.get(arg, {}))
    return out
