"""Nested state dicts of tensors: CPU snapshots, clones and sizes.

Imports torch; never imported by the operator. Nothing here touches storage.
"""
from __future__ import annotations

import io
from typing import Any, Callable

import torch


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


def to_cpu(obj: Any) -> Any:
    """Deep copy of a (nested) state dict with every tensor copied to CPU memory.

    This is the only part of a checkpoint the training loop waits for; on GPU the copies are
    issued non-blocking and synchronised once at the end.
    """
    pending_cuda = []

    def copy(o: torch.Tensor) -> torch.Tensor:
        if o.device.type == "cpu":
            return o.detach().clone()
        t = torch.empty(o.shape, dtype=o.dtype, device="cpu", pin_memory=True)
        t.copy_(o.detach(), non_blocking=True)
        pending_cuda.append(t)
        return t

    out = map_tensors(obj, copy)
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
