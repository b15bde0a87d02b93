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
    """The helper threads of ``parallel_copy`` and of ``to_cpu_overlapped``'s deferred
    copies: started on first use, by the training thread (so at its priority: the loop
    waits for them), and started again in a forked copy of the process, where its parent's
    threads do not exist."""

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
    if threads <= 1 or _nbytes(pairs) < PARALLEL_COPY_MIN_BYTES:
        for dst, src in pairs:
            dst.copy_(src)
        return
    drain = _drainer(pairs, piece_bytes)
    pool = _COPY_POOL.get(threads - 1)
    helpers = [pool.submit(drain) for _ in range(threads - 1)]
    try:
        drain()
    finally:
        for f in helpers:
            f.result()


def _nbytes(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(src.numel() * src.element_size() for _, src in pairs)


def _drainer(pairs: list[tuple[torch.Tensor, torch.Tensor]], piece_bytes: int) -> Callable[[], None]:
    """A function that copies pieces of ``pairs`` until none is left; any number of threads
    may run it at once."""
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

    return drain


class CopyInFlight:
    """Copies of a CPU snapshot still running on the snapshot threads while the loop goes on
    (``to_cpu_overlapped``). ``settle()`` waits for them and says whether every source kept
    its version counter meanwhile: no in-place write reached it since the copy began (the
    optimizer's step, a callback's edit), so the copy is the state of that moment. Writes
    that bypass the counter (through ``.data``) are not seen: the trainer settles before
    its optimizer's step, the first thing that writes what it defers."""

    def __init__(self, futures: list, sources: list[torch.Tensor]) -> None:
        self._futures = futures
        self._versions = [(t, t._version) for t in sources]
        self.settled: bool | None = None

    def settle(self) -> bool:
        if self.settled is None:
            for f in self._futures:
                f.result()
            self.settled = all(t._version == v for t, v in self._versions)
            self._versions = []  # no reference to the live state is kept
        return self.settled


def to_cpu(obj: Any, threads: int | None = None) -> Any:
    """Deep copy of a (nested) state dict with every tensor copied to CPU memory.

    This is the only part of a checkpoint the training loop waits for. On GPU the copies are
    issued non-blocking into pinned memory and synchronised once at the end. CPU tensors
    are copied by ``threads`` threads (``snapshot_threads``): a plain contiguous tensor
    into fresh memory by ``parallel_copy``, anything else (strided views, sparse, quantized,
    subclasses) by ``clone`` on the calling thread.
    """
    return to_cpu_overlapped(obj, threads)[0]


def to_cpu_overlapped(obj: Any, threads: int | None = None,
                      defer: Callable[[torch.Tensor], bool] | None = None,
                      ) -> tuple[Any, CopyInFlight | None]:
    """``to_cpu``, except that the plain contiguous CPU tensors ``defer`` picks are copied on
    the snapshot threads after this returns (``CopyInFlight``, None when none was deferred):
    the caller goes on while they copy and settles before anything writes them. Deferred
    only with at least two threads and ``PARALLEL_COPY_MIN_BYTES`` of such tensors."""
    threads = snapshot_threads() if threads is None else threads
    pending_cuda = []
    cpu_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    later: list[tuple[torch.Tensor, torch.Tensor]] = []

    def copy(o: torch.Tensor) -> torch.Tensor:
        chosen = defer is not None and defer(o)
        o = o.detach()
        if o.device.type == "cpu":
            if type(o) is torch.Tensor and o.layout == torch.strided and not o.is_quantized \
                    and o.is_contiguous():
                t = torch.empty_like(o, memory_format=torch.contiguous_format)
                (later if chosen else cpu_pairs).append((t, o))
                return t
            return o.clone()
        t = torch.empty(o.shape, dtype=o.dtype, device="cpu", pin_memory=True)
        t.copy_(o, non_blocking=True)
        pending_cuda.append(t)
        return t

    out = map_tensors(obj, copy)
    if later and (threads < 2 or _nbytes(later) < PARALLEL_COPY_MIN_BYTES):
        cpu_pairs, later = cpu_pairs + later, []
    parallel_copy(cpu_pairs, threads)
    if pending_cuda:
        torch.cuda.synchronize()
    if not later:
        return out, None
    futures: list = []
    in_flight = CopyInFlight(futures, [src for _, src in later])  # versions read before any copy
    drain = _drainer(later, COPY_PIECE_BYTES)
    pool = _COPY_POOL.get(threads - 1)
    futures += [pool.submit(drain) for _ in range(threads - 1)]
    return out, in_flight


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
