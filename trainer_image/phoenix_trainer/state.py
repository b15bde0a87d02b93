"""Everything needed to put a training process back exactly where it was.

RNG capture/restore (python, numpy, torch CPU, CUDA), CPU snapshots of state dicts, and a
resumable shuffling sampler whose permutation depends only on (seed, epoch), so a resumed
run sees the same batches in the same order. Imports torch; never imported by the operator.
Nothing here touches storage.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Exactness:
    """Whether a resume reproduces the uninterrupted run bit for bit, and if not, why."""

    exact: bool
    reason: str = ""

    @staticmethod
    def combine(*parts: "Exactness") -> "Exactness":
        bad = [p.reason for p in parts if not p.exact]
        return Exactness(not bad, "; ".join(bad))


EXACT = Exactness(True)


def kernel_exactness(module: torch.nn.Module) -> Exactness:
    """CPU kernels repeat themselves; CUDA ones only when told to (cuBLAS, atomics, cuDNN)."""
    if not any(p.is_cuda for p in module.parameters()):
        return EXACT
    if torch.backends.cudnn.benchmark:
        return Exactness(False, "torch.backends.cudnn.benchmark=True picks kernels by timing,"
                                " so a resumed run may compute differently; set it to False")
    if not torch.are_deterministic_algorithms_enabled():
        return Exactness(False, "CUDA kernels may be nondeterministic: call"
                                " torch.use_deterministic_algorithms(True) and set"
                                " CUBLAS_WORKSPACE_CONFIG=:4096:8")
    return EXACT


def capture_rng() -> dict[str, Any]:
    """All global RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            # Different GPU count than at save time: the run cannot be bitwise identical, but
            # restoring what we can is still better than fresh seeds.
            cuda = cuda[: torch.cuda.device_count()]
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)


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


def tree_nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tree_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tree_nbytes(v) for v in obj)
    return 0


class ResumableShuffleSampler(Sampler[int]):
    """Shuffles ``num_samples`` indices with a permutation derived from (seed, epoch) only.

    ``set_epoch(e)`` starts epoch ``e`` from its beginning; ``skip(n)`` makes the next
    iteration start ``n`` samples into the epoch (what a mid-epoch resume needs). The global
    RNG is never touched, so dropout and friends see the same random stream either way.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"ResumableShuffleSampler needs num_samples > 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.offset = 0

    def skip(self, samples: int) -> None:
        if not 0 <= samples <= self.num_samples:
            raise ValueError(f"cannot skip {samples} of {self.num_samples} samples")
        self.offset = int(samples)

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        # Mix epoch into the seed so consecutive epochs are unrelated permutations.
        g.manual_seed((self.seed * 1_000_003 + epoch * 7_919) % (2**63 - 1))
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation(self.epoch)[self.offset:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.offset

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"sampler was saved over {state['num_samples']} samples but the dataset now has"
                f" {self.num_samples}; resuming would not see the same data")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
