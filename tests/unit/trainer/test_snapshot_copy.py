"""The CPU snapshot's copy (``tensors.to_cpu``): spread over threads, equal to a clone,
independent of the training state it was taken from."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from phoenix_trainer import tensors
from phoenix_trainer.checkpoint import Snapshot
from phoenix_trainer.core.errors import CheckpointError
from phoenix_trainer.tensors import (
    PARALLEL_COPY_MIN_BYTES, map_tensors, parallel_copy, snapshot_threads, to_cpu,
)

pytestmark = pytest.mark.unit


def state(big_elements: int) -> dict:
    """A model/optimizer-like tree: one tensor over the parallel threshold, small ones,
    other dtypes, a 0-dim step, a strided view, a parameter that requires grad."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    return {
        "model.pt": {"big": torch.randn(big_elements, generator=g),
                     "w": torch.nn.Parameter(torch.randn(33, 7, generator=g)),
                     "half": torch.randn(1000, generator=g).to(torch.bfloat16),
                     "mask": torch.rand(777, generator=g) > 0.5,
                     "ids": torch.randint(0, 1 << 40, (501,), generator=g)},
        "optimizer.pt": {"state": {0: {"step": torch.tensor(12.0),
                                       "exp_avg": torch.randn(2049, generator=g)}},
                         "param_groups": [{"lr": 0.1, "params": [0]}]},
        "view.pt": {"t": base.t(), "slice": base[::3, 5:9]},
    }


def leaves(tree) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_tensors(tree, found.append)
    return found


BIG = PARALLEL_COPY_MIN_BYTES // 4 + 12345  # float32 elements: over the threshold, not a whole piece


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_copy_equals_a_clone_and_owns_its_memory(threads):
    src = state(BIG)
    out = to_cpu(src, threads)
    pairs = list(zip(leaves(src), leaves(out)))
    assert len(pairs) == 9
    for a, b in pairs:
        assert b.dtype == a.dtype and b.shape == a.shape
        assert torch.equal(a.detach(), b)
        assert not b.requires_grad
        assert b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    # The structure is kept, non-tensor leaves included.
    assert out["optimizer.pt"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    # Training goes on: the snapshot does not move with it.
    before = out["model.pt"]["big"].clone()
    with torch.no_grad():
        for t in leaves(src):
            t.zero_()
    assert torch.equal(out["model.pt"]["big"], before)


def spy_copies(monkeypatch, before=None) -> set[str]:
    """The names of the threads that ``Tensor.copy_`` runs on from now on; ``before(thread)``,
    where given, runs first in each copy."""
    names: set[str] = set()
    original = torch.Tensor.copy_

    def spy(self, other, *a, **k):
        names.add(threading.current_thread().name)
        if before is not None:
            before(threading.current_thread())
        return original(self, other, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    return names


def test_a_large_copy_is_split_into_pieces_across_the_threads(monkeypatch):
    n = 5 * 1024 + 3
    src = [torch.arange(n, dtype=torch.float64), torch.arange(7, dtype=torch.int16)]
    dst = [torch.empty_like(t) for t in src]
    monkeypatch.setattr(tensors, "PARALLEL_COPY_MIN_BYTES", 0)
    helper_copied = threading.Event()

    def hold_the_caller(thread: threading.Thread) -> None:
        if thread.name.startswith("phoenix-snapshot"):
            helper_copied.set()
        else:  # the caller leaves pieces for a helper: tiny pieces would all be its own
            helper_copied.wait(10)

    names = spy_copies(monkeypatch, hold_the_caller)
    # Pieces of 1 KiB: 41 of the first tensor (the last one short), 1 of the second.
    parallel_copy(list(zip(dst, src)), threads=3, piece_bytes=1024)
    assert all(torch.equal(a, b) for a, b in zip(src, dst))
    assert threading.current_thread().name in names
    assert any(name.startswith("phoenix-snapshot") for name in names)


def test_a_small_snapshot_is_copied_on_the_calling_thread_alone(monkeypatch):
    src = {"w": torch.randn(100)}
    names = spy_copies(monkeypatch)
    out = to_cpu(src, threads=4)
    assert names == {threading.current_thread().name}
    assert torch.equal(out["w"], src["w"])


def test_snapshot_take_copies_every_shard_at_once():
    src = state(BIG)
    snap = Snapshot.take(7, 1, src, {"trainer.json": {"step": 7}}, threads=2)
    assert set(snap.tensors) == set(src)
    assert snap.nbytes == sum(t.numel() * t.element_size() for t in leaves(src))
    assert torch.equal(snap.tensors["model.pt"]["big"], src["model.pt"]["big"])


@pytest.mark.parametrize("raw, expected", [("1", 1), (" 3 ", 3), ("64", 64)])
def test_snapshot_threads_setting(raw, expected):
    assert snapshot_threads({"PHOENIX_SNAPSHOT_THREADS": raw}) == expected


def test_snapshot_threads_default_is_the_usable_cpus_at_most_four():
    assert snapshot_threads({}) == max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.mark.parametrize("raw", ["0", "-2", "65", "two", "1.5"])
def test_a_malformed_snapshot_threads_setting_is_refused_by_name(raw):
    with pytest.raises(CheckpointError, match=f"PHOENIX_SNAPSHOT_THREADS={raw!r}"):
        snapshot_threads({"PHOENIX_SNAPSHOT_THREADS": raw})
