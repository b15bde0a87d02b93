"""Nested state dicts of tensors: CPU snapshots, clones and sizes.

Imports torch; never imported by the operator. Nothing here touches storage.
"""
from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import torch

from .core.contract import ENV_SNAPSHOT_THREADS, whole_number_setting


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """A copy of a nested dict/list/tuple structure with ``fn`` applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    return obj


# A CPU snapshot is copied in pieces of this size, so even one large tensor spreads over
# the copying threads; below PARALLEL_COPY_MIN_BYTES in all, the loop's thread copies alone
# (handing pieces to other threads would cost more than it saves).
COPY_PIECE_BYTES = 4 << 20
PARALLEL_COPY_MIN_BYTES = 16 << 20
MAX_DEFAULT_SNAPSHOT_THREADS = 4


def snapshot_threads(environ: Mapping[str, str] | None = None) -> int:
    """``PHOENIX_SNAPSHOT_THREADS``: how many threads copy a CPU snapshot, the training
    thread included (default: the CPUs this process may use, at most 4; 1: the training
    thread alone)."""
    default = max(1, min(MAX_DEFAULT_SNAPSHOT_THREADS, len(os.sched_getaffinity(0))))
    return whole_number_setting(os.environ if environ is None else environ,
                                ENV_SNAPSHOT_THREADS, default, 1, 64)


class _CopyPool:
    """The helper threads of ``parallel_copy``: started on first use, by the training thread
    (so at its priority: the loop waits for them), and started again in a forked copy of
    the process, where its parent's threads do not exist."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        self._pid = 0

    def get(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid() or self._size != workers:
                if self._pool is not None and self._pid == os.getpid():
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="phoenix-snapshot")
                self._size, self._pid = workers, os.getpid()
            return self._pool


_COPY_POOL = _CopyPool()


def parallel_copy(pairs: list[tuple[torch.Tensor, torch.Tensor]], threads: int,
                  piece_bytes: int = COPY_PIECE_BYTES) -> None:
    """``dst.copy_(src)`` for every (dst, src) pair of contiguous CPU tensors of one shape
    and dtype, in pieces of about ``piece_bytes`` spread over ``threads`` threads (the
    caller's among them). torch drops the GIL while it copies, so the pieces run at once;
    the first touch of fresh memory (a page fault per page) is spread over them too."""
    total = sum(src.numel() * src.element_size() for _, src in pairs)
    if threads <= 1 or total < PARALLEL_COPY_MIN_BYTES:
        for dst, src in pairs:
            dst.copy_(src)
        return
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    for dst, src in pairs:
        d, s = dst.view(-1), src.view(-1)
        step = max(1, piece_bytes // max(1, src.element_size()))
        pieces += [(d[i:i + step], s[i:i + step]) for i in range(0, s.numel(), step)]
    todo = iter(pieces)
    take = threading.Lock()

    def drain() -> None:
        while True:
            with take:
                piece = next(todo, None)
            if piece is None:
                return
            piece[0].copy_(piece[1])

    pool = _COPY_POOL.get(threads - 1)
    helpers = [pool.submit(drain) for _ in range(threads - 1)]
    try:
        drain()
    finally:
        for f in helpers:
            f.result()


def to_cpu(obj: Any, threads: int | None = None) -> Any:
    """Deep copy of a (nested) state dict with every tensor copied to CPU memory.

    This is the only part of a checkpoint the training loop waits for. On GPU the copies are
    issued non-blocking into pinned memory and synchronised once at the end. CPU tensors
    are copied by ``threads`` threads (``snapshot_threads``): a plain contiguous tensor
    into fresh memory by ``parallel_copy``, anything else (strided views, sparse, quantized,
    subclasses) by ``clone`` on the calling thread.
    """
    pending_cuda = []
    cpu_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def copy(o: torch.Tensor) -> torch.Tensor:
        o = o.detach()
        if o.device.type == "cpu":
            if type(o) is torch.Tensor and o.layout == torch.strided and not o.is_quantized \
                    and o.is_contiguous():
                t = torch.empty_like(o, memory_format=torch.contiguous_format)
                cpu_pairs.append((t, o))
                return t
            return o.clone()
        t = torch.empty(o.shape, dtype=o.dtype, device="cpu", pin_memory=True)
        t.copy_(o, non_blocking=True)
        pending_cuda.append(t)
        return t

    out = map_tensors(obj, copy)
    parallel_copy(cpu_pairs, snapshot_threads() if threads is None else threads)
    if pending_cuda:
        torch.cuda.synchronize()
    return out


def clone_tree(obj: Any) -> Any:
    """A copy safe to hand to ``load_state_dict``: optimizers alias tensors they are given."""
    return map_tensors(obj, torch.Tensor.clone)


def tree_nbytes(obj: Any, local: Callable[[Any], Any] | None = None) -> int:
    """Bytes of the tensors in a state tree; ``local`` first maps each node to what this
    process holds of it (a DTensor's shard: ``dcp_storage.local_nbytes``)."""
    if local is not None:
        obj = local(obj)
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tree_nbytes(v, local) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tree_nbytes(v, local) for v in obj)
    return 0


def unloadable_globals(obj: Any) -> list[str]:
    """The classes and functions in ``obj`` that ``torch.load(weights_only=True)`` (how a
    restore loads) refuses, e.g. ``numpy.ndarray`` or a class of the script's own. Pickles
    the structure with every tensor replaced by an empty one: costs the tree, not the bytes."""
    buf = io.BytesIO()
    torch.save(map_tensors(obj, lambda t: torch.empty(0)), buf)
    buf.seek(0)
    return torch.serialization.get_unsafe_globals_in_checkpoint(buf)
