"""Phoenix trainer runtime: staged modules, S3 checkpoints, bit-exact resume, SIGTERM handshake.

Kept free of torch imports so the operator can import ``phoenix_trainer.core`` (contract,
storage, layout, handshake) without shipping torch. Heavy pieces load lazily:

    from phoenix_trainer import Trainer, Stage, StagedModule, ResumableShuffleSampler
    from phoenix_trainer import Session      # any other loop: restore / save / stop / finish
    from phoenix_trainer import CheckpointPolicy, RecoveryPolicy, DataPolicy, ReportingPolicy
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "Stage", "StagedModule", "Trainer", "Callback", "RunResult", "ResumableShuffleSampler",
    "AsyncCheckpointer", "load_checkpoint", "TrainerEnv", "TerminationMessage", "open_storage",
    "Session", "Restored", "capture_rng", "restore_rng", "adapt_loader",
    "CheckpointPolicy", "RecoveryPolicy", "DataPolicy", "ReportingPolicy",
]

_LAZY = {
    "Stage": "stages", "StagedModule": "stages", "Trainer": "trainer", "Callback": "trainer",
    "RunResult": "session", "Session": "session", "Restored": "session",
    "capture_rng": "determinism", "restore_rng": "determinism", "adapt_loader": "loaders",
    "ResumableShuffleSampler": "samplers", "AsyncCheckpointer": "checkpoint",
    "load_checkpoint": "checkpoint", "TrainerEnv": "core.contract",
    "TerminationMessage": "core.contract", "open_storage": "core.storage",
    "CheckpointPolicy": "policies", "RecoveryPolicy": "policies", "DataPolicy": "policies",
    "ReportingPolicy": "policies",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'phoenix_trainer' has no attribute {name!r}")
