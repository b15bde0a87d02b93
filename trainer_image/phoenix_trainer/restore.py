"""Finding and loading the checkpoint a session starts from.

``Restorer`` picks this phase's newest valid checkpoint (or ``PHOENIX_RESUME_FROM``'s), falls
back over damaged ones, refuses a silent config change, reuses what a standby preloaded, and
otherwise takes the previous phase's weights (``PHOENIX_INIT_FROM``). The choice is made the
same way for one process and for a process group: the peers' leader picks each candidate,
every process loads its own part, and all fall back together if any could not. How a
process loads its part is the ``loader`` part: ``LocalLoader`` (every shard, taking those the
start-up ``prefetch.Prefetch`` already holds) or a process group's (distributed.py).

Never writes to storage, never starts or stops uploads, never waits for a fence (standby.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from .checkpoint import TRAINER_DOC, load_checkpoint
from .checkpointing import RunIdentity
from .core.contract import TrainerEnv
from .core.errors import CheckpointError, ConfigMismatchError, CorruptCheckpointError
from .core.layout import (
    CheckpointInfo,
    latest_valid_checkpoint,
    split_checkpoint_uri,
    verify_checkpoint,
)
from .core.storage import Storage, open_storage
from .core.writer import RetryPolicy
from .peers import Peers
from .prefetch import Prefetch


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


class Loader(Protocol):
    def load(self, storage: Storage, info: CheckpointInfo, prefetch: Prefetch | None) -> Restored:
        """This process's part of ``info``, verified; CorruptCheckpointError if unusable."""
    def close(self) -> None: ...


class LocalLoader:
    """Every shard of a checkpoint into memory (size and digest checked against the
    manifest); shards the prefetch already downloaded are taken from it."""

    def load(self, storage: Storage, info: CheckpointInfo, prefetch: Prefetch | None) -> Restored:
        assert info.manifest is not None
        state = load_checkpoint(storage, info, None if prefetch is None else (
            lambda name: prefetch.take(info.uri, name)))
        return Restored("resume", info.step, info.manifest.epoch, info, state)

    def close(self) -> None:
        pass


class Restorer:
    """The checkpoint a session starts from; see the module docstring."""

    def __init__(self, *, env: TrainerEnv, storage: Storage | None, run: RunIdentity, peers: Peers,
                 loader: Loader, prefetch: Prefetch | None, log: logging.LoggerAdapter,
                 retry: RetryPolicy | None = None) -> None:
        self.env, self.storage, self.run, self.peers, self.log = env, storage, run, peers, log
        self.loader = loader
        # Listing and reading manifests retry a storage blip the way uploads do: a replacement
        # pod whose first requests time out would otherwise fail its attempt.
        self.retry = retry or RetryPolicy()
        self.prefetch = prefetch  # the start-up download (prefetch.py), until the restore ends
        self.prefetched: dict[str, Any] | None = None  # its summary, afterwards
        self.warm: Restored | None = None  # a standby's preloaded checkpoint

    def find_own(self, target: str | None) -> Restored | None:
        """This phase's checkpoint to resume: ``target`` (a step directory) if it loads, else
        the newest valid one below it, falling back over any a process cannot load."""
        assert self.storage is not None
        first, store = self._target(target)
        tried: set[int] = set()
        below: int | None = None

        def find() -> tuple[bool, CheckpointInfo] | None:
            if first is not None and first not in tried:
                return True, verify_checkpoint(store, first, deep=False)
            info = latest_valid_checkpoint(self.storage, deep=False, exclude_steps=tried,
                                           below_step=below)
            return (False, info) if info is not None else None

        def candidate() -> tuple[bool, CheckpointInfo] | None:
            return self.retry.run("finding the checkpoint to resume", find)

        while True:
            picked = self.peers.pick(candidate)
            if picked is None:
                if tried:
                    self.log.warning("no usable checkpoint under %s; starting from scratch", self.storage.uri)
                return None
            is_target, info = picked
            loaded = None
            if info.valid:
                loaded = self.try_load(store if is_target else self.storage, info)
            else:
                self.log.warning("PHOENIX_RESUME_FROM=%s is not a valid checkpoint (%s); falling back"
                                 " to the previous valid checkpoint", info.uri, info.reason)
            if self.peers.all(loaded is not None):
                return loaded
            if loaded is not None:
                self.log.warning("a peer rank could not load %s; falling back with it", info.uri)
            tried.add(info.step)
            if is_target:
                below = info.step

    def _target(self, target: str | None) -> tuple[int | None, Storage]:
        """The step ``target`` names and the store it lives in (this phase's, or another)."""
        assert self.storage is not None
        if not target:
            return None, self.storage
        prefix, step = split_checkpoint_uri(target)
        if step is None:
            raise CheckpointError(
                f"PHOENIX_RESUME_FROM={target!r} does not name a step directory"
                f" (…/step-NNNNNNNNNN); fix the operator's resume target")
        if prefix.rstrip("/") == self.storage.uri.rstrip("/"):
            return step, self.storage
        self.log.warning("PHOENIX_RESUME_FROM points outside this phase's prefix %s;"
                         " resuming from it anyway", self.storage.uri)
        return step, open_storage(prefix)

    def try_load(self, storage: Storage, info: CheckpointInfo) -> Restored | None:
        """This process's part of ``info`` (the preloaded one if it is that), or None if it is
        unusable. A config change raises ConfigMismatchError."""
        assert info.manifest is not None
        self.check_config(info)
        if self.warm is not None and self.warm.info.uri == info.uri:
            self.log.info("resuming from the preloaded checkpoint step %d", info.step)
            return self.warm
        try:
            return self.loader.load(storage, info, self.prefetch)
        except CorruptCheckpointError as e:
            self.log.warning("checkpoint %s is unusable (%s); falling back to the previous valid"
                             " checkpoint", info.uri, e)
            return None

    def check_config(self, info: CheckpointInfo) -> None:
        """Refuse to resume across a config change, unless PHOENIX_FORCE_RESUME=1."""
        assert info.manifest is not None
        mine = self.run.fingerprint
        if info.manifest.config_fingerprint != mine:
            if not self.env.force_resume:
                raise ConfigMismatchError(
                    f"checkpoint {info.uri} was written with config {info.manifest.config_fingerprint}"
                    f" but this run's config is {mine}; resuming would silently mix"
                    f" configs. Restore the old config, start a fresh prefix, or set"
                    f" PHOENIX_FORCE_RESUME=1 to resume anyway")
            self.log.warning("resuming %s across a config change (%s -> %s) because"
                             " PHOENIX_FORCE_RESUME=1", info.uri, info.manifest.config_fingerprint, mine)

    def init_from(self) -> Restored | None:
        """The previous phase's weights (``PHOENIX_INIT_FROM``), or None if none is named."""
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

    def end_prefetch(self) -> None:
        """Drop what the start-up prefetch holds; say what it did."""
        pre, self.prefetch = self.prefetch, None
        if pre is None:
            return
        pre.close()
        self.prefetched = pre.summary()
        resumed = self.run.resumed_from
        if pre.error:
            self.log.warning("prefetching %s during start-up did not work (%s); the restore"
                             " downloaded it", pre.uri, pre.error)
        elif resumed is not None and resumed.uri.rstrip("/") == pre.uri:
            self.log.info("checkpoint %s was downloaded during start-up (%.1f MB; the restore"
                          " waited %.2fs for it)", pre.uri, pre.nbytes / 1e6, pre.waited)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
            self.prefetch = None
        self.loader.close()
