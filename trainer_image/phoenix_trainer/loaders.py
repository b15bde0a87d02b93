"""Data loaders whose position can be saved and restored exactly, or that say why not.

The trainer never iterates the user's loader directly; ``adapt_loader`` wraps it in one of:

- ``ResumableLoader`` for a map-style ``torch.utils.data.DataLoader`` (any ``num_workers``,
  ``shuffle=True`` with or without a ``generator``, ``ResumableShuffleSampler``,
  ``DistributedSampler``). Exact, by three rules:
  1. *Order*: each epoch's order is a function of (root seed, epoch) only. A sampler that
     draws from a generator (``shuffle=True``, with or without the user's ``generator``)
     runs on a copy with a private generator reseeded at every epoch start; one with
     ``set_epoch`` is told the epoch. The root seed is the user's generator's (or torch's)
     initial seed and travels in the checkpoint; the loader never draws from the global RNG
     that the model's dropout uses.
  2. *Position*: a resume rebuilds the epoch's index stream from the recorded state and
     skips the consumed batches as lists of indices: nothing is read, decoded or sent to a
     worker for them.
  3. *Worker randomness*: every batch is fetched and collated with the global RNGs
     (torch, ``random``, numpy) seeded from (root seed, epoch, batch index), in whichever
     worker fetches it (in the main process the caller's RNG state is put back afterwards,
     after the collate function). A random transform in ``__getitem__`` or a random
     collate function (masked-LM masking) therefore sees the same numbers whether the batch
     is fetched in an uninterrupted run, after a resume, or by a different worker.
  What this cannot restore: per-worker RNGs a dataset creates itself (e.g. in
  ``worker_init_fn``); draw from the global RNGs inside ``__getitem__`` instead.
- ``StatefulLoader`` for a loader with its own ``state_dict``/``load_state_dict`` (e.g.
  torchdata's ``StatefulDataLoader``): the position is its own business; Phoenix saves what
  it returns and cannot vouch for the worker RNGs, so the resume is reported as not exact.
- ``ReplayLoader`` for anything else that can be iterated again (an ``IterableDataset``, a
  list of batches, a generator factory): a mid-epoch resume reads through the consumed
  batches, which is exact only if iterating is deterministic; reported as not exact.

``Exactness`` carries the verdict and the reason to the termination message, the
checkpoint manifest and the PhoenixJob's ``ResumeExact`` condition. Imports torch.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler, get_worker_info,
)

from .determinism import EXACT, Exactness


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across processes and versions)."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_global_rngs(seed: int) -> None:
    """torch's CPU generator (``torch.manual_seed`` would also touch every device: 100x
    slower), python's and numpy's global RNGs."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)


class _SeededBatch(list):
    """A batch of dataset indices tagged with the seed its fetch must use (pickles to workers)."""

    seed: int | None = None


def _collated(batch: list) -> Any:
    """The DataLoader's collate function: ``_SeededDataset`` has collated already."""
    return batch[0]


class _SeededDataset(Dataset):
    """Fetches and collates each tagged batch with the global RNGs seeded from the batch's
    own seed. It returns ``[collated batch]``, which ``_collated`` unwraps: the collate
    function runs inside the seeded region, also in the main process (``num_workers=0``),
    where it would otherwise draw from the training step's RNG state."""

    def __init__(self, inner: Dataset, collate_fn: Any) -> None:
        self.inner, self.collate_fn = inner, collate_fn

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> Any:
        return self.inner[index]

    def __getitems__(self, indices: list) -> list:
        seed = getattr(indices, "seed", None)
        if seed is None:
            return self._fetch(indices)
        if get_worker_info() is not None:
            seed_global_rngs(seed)  # a worker's RNGs serve only its fetches
            return self._fetch(indices)
        # Main process (num_workers=0): the global RNGs belong to the training step too.
        # About 0.1 ms per batch, most of it numpy's state; workers skip it.
        saved = (torch.default_generator.get_state(), random.getstate(), np.random.get_state())
        try:
            seed_global_rngs(seed)
            return self._fetch(indices)
        finally:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])

    def _fetch(self, indices: list) -> list:
        getitems = getattr(self.inner, "__getitems__", None)
        samples = getitems(list(indices)) if getitems is not None else [self.inner[i] for i in indices]
        return [self.collate_fn(samples)]


class _PositionedBatches:
    """The epoch's batches of indices, skipping the consumed ones, each tagged with a seed."""

    def __init__(self, owner: "ResumableLoader") -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[list]:
        o = self.owner
        inner = iter(o.batch_sampler)
        for _ in range(o.skip):
            if next(inner, None) is None:
                return
        for b, indices in enumerate(inner, start=o.skip):
            tagged = _SeededBatch(indices)
            tagged.seed = derive_seed(o.root_seed, o.epoch, b)
            yield tagged

    def __len__(self) -> int:
        return len(self.owner.batch_sampler)


class AdaptedLoader:
    """What the trainer iterates: one epoch at a time from a (possibly mid-epoch) position."""

    exactness: Exactness = EXACT
    batch_size: int | None = None
    batches_per_epoch: int | None = None  # None: the loader has no len()

    def epoch_iterator(self, epoch: int, skip: int) -> Iterator[Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any] | None:
        """What to save with a checkpoint taken now (JSON-able)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Take a saved state; it applies to the next ``epoch_iterator`` call."""


def _len_or_none(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


class ResumableLoader(AdaptedLoader):
    """A map-style DataLoader rebuilt so that its position can be restored exactly."""

    def __init__(self, loader: DataLoader) -> None:
        if loader.batch_sampler is None:
            raise TypeError("batch_size=None loaders are not supported by ResumableLoader")
        self.original = loader
        self.batch_size = loader.batch_size
        gen = loader.generator
        # A seed that needs no draw from anyone's RNG: the user's seeding decides it, and the
        # checkpoint carries it, so a resumed process need not be seeded the same way.
        self.root_seed = int(gen.initial_seed() if gen is not None else torch.initial_seed())
        self.epoch, self.skip = 0, 0
        self.generators: list[torch.Generator] = []
        self.epoch_samplers: list[Any] = []
        self.batch_sampler, why = self._own(loader.batch_sampler)
        self.exactness = Exactness(why is None, why or "")
        self.batches_per_epoch = _len_or_none(self.batch_sampler)
        self._base_gen = torch.Generator()  # worker base seeds, reseeded per epoch
        kwargs: dict[str, Any] = dict(
            batch_sampler=_PositionedBatches(self), num_workers=loader.num_workers,
            collate_fn=_collated, pin_memory=loader.pin_memory, timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn, generator=self._base_gen,
            persistent_workers=loader.persistent_workers,
            pin_memory_device=getattr(loader, "pin_memory_device", ""),
        )
        if loader.num_workers > 0:
            kwargs["multiprocessing_context"] = loader.multiprocessing_context
            kwargs["prefetch_factor"] = loader.prefetch_factor
        if hasattr(loader, "in_order"):
            kwargs["in_order"] = loader.in_order
        self.loader = DataLoader(_SeededDataset(loader.dataset, loader.collate_fn), **kwargs)

    def _own(self, batch_sampler: Any) -> tuple[Any, str | None]:
        """A copy of the batch sampler whose order depends only on (root seed, epoch).

        A sampler drawing from a generator (``RandomSampler`` and friends, with or without
        the user's generator) gets a private generator reseeded at every epoch start; one
        with ``set_epoch`` (``DistributedSampler``, ``ResumableShuffleSampler``) is told the
        epoch; a ``SequentialSampler`` needs nothing. Anything else cannot be vouched for.
        """
        if type(batch_sampler) is BatchSampler:
            outer = copy.copy(batch_sampler)
            outer.sampler, why = self._own_sampler(batch_sampler.sampler)
            return outer, why
        return self._own_sampler(batch_sampler)

    def _own_sampler(self, s: Any) -> tuple[Any, str | None]:
        if hasattr(s, "set_epoch"):
            self.epoch_samplers.append(s)
            return s, None
        if hasattr(s, "generator"):
            s = copy.copy(s)  # the user's sampler and generator stay untouched
            s.generator = torch.Generator()
            self.generators.append(s.generator)
            return s, None
        if isinstance(s, (SequentialSampler, range, list, tuple)):
            return s, None
        return s, (f"sampler {type(s).__name__} has neither a generator nor set_epoch(); Phoenix"
                   " cannot restore its order (use ResumableShuffleSampler, or give it"
                   " set_epoch(epoch) that makes its order a function of the epoch)")

    def epoch_iterator(self, epoch: int, skip: int) -> Iterator[Any]:
        self.epoch, self.skip = int(epoch), int(skip)
        for i, g in enumerate(self.generators):
            g.manual_seed(derive_seed(self.root_seed, self.epoch, i))
        for s in self.epoch_samplers:
            s.set_epoch(self.epoch)
        self._base_gen.manual_seed(derive_seed(self.root_seed, self.epoch, -1))
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "resumable", "rootSeed": self.root_seed}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state and state.get("kind") == "resumable":
            self.root_seed = int(state["rootSeed"])


class StatefulLoader(AdaptedLoader):
    """A loader that checkpoints its own position (``state_dict``/``load_state_dict``)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.batch_size = getattr(loader, "batch_size", None)
        self.batches_per_epoch = _len_or_none(loader)
        self.exactness = Exactness(False, (
            f"{type(loader).__name__} restores its own position; Phoenix cannot check that it"
            " restores worker RNG states (random transforms may differ after a resume)"))
        self._restored: dict[str, Any] | None = None

    def epoch_iterator(self, epoch: int, skip: int) -> Iterator[Any]:
        if self._restored is not None:
            self.loader.load_state_dict(self._restored)
            self._restored = None
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "stateful", "state": _json_safe(self.loader.state_dict())}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state and state.get("kind") == "stateful":
            self._restored = _from_json_safe(state["state"])


class ReplayLoader(AdaptedLoader):
    """Any re-iterable: a mid-epoch resume reads through the consumed batches."""

    def __init__(self, loader: Iterable, why: str) -> None:
        self.loader = loader
        self.batch_size = getattr(loader, "batch_size", None)
        self.batches_per_epoch = _len_or_none(loader)
        self.exactness = Exactness(False, why)
        self.sampler = _find_set_epoch(loader)

    def epoch_iterator(self, epoch: int, skip: int) -> Iterator[Any]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        it = iter(self.loader)
        for _ in range(skip):
            if next(it, _END) is _END:
                break
        return it


_END = object()


def _json_safe(obj: Any) -> Any:
    """``obj`` itself if it is JSON, else its ``torch.save`` bytes in base64 (tensors, ...)."""
    try:
        json.dumps(obj)
        return obj
    except (TypeError, ValueError):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return {"torchSaveBase64": base64.b64encode(buf.getvalue()).decode()}


def _from_json_safe(obj: Any) -> Any:
    if isinstance(obj, dict) and set(obj) == {"torchSaveBase64"}:
        return torch.load(io.BytesIO(base64.b64decode(obj["torchSaveBase64"])), weights_only=True)
    return obj


def _find_set_epoch(loader: Any) -> Any:
    for cand in (getattr(loader, "sampler", None),
                 getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if cand is not None and hasattr(cand, "set_epoch"):
            return cand
    return None


def adapt_loader(loader: Iterable) -> AdaptedLoader:
    """The right adapter for ``loader`` (see the module docstring)."""
    if isinstance(loader, AdaptedLoader):
        return loader
    if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict"):
        return StatefulLoader(loader)
    if isinstance(loader, DataLoader):
        if isinstance(loader.dataset, IterableDataset):
            return ReplayLoader(loader, (
                f"IterableDataset {type(loader.dataset).__name__} has no state_dict(); a resume"
                " re-reads the consumed batches, exact only if iterating it is deterministic"))
        if loader.batch_sampler is None:
            return ReplayLoader(loader, (
                "DataLoader(batch_size=None) yields single samples; a resume re-reads the"
                " consumed ones, exact only if the dataset is deterministic"))
        return ResumableLoader(loader)
    return ReplayLoader(loader, (
        f"{type(loader).__name__} is not a DataLoader and has no state_dict(); a resume"
        " re-reads the consumed batches, exact only if iterating it is deterministic"))
