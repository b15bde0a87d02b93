"""Whether and how a resumed run repeats the uninterrupted one bit for bit.

RNG capture/restore (python, numpy, torch CPU, CUDA) and ``Exactness``: whether a resume is
bit-exact and, if not, why (``kernel_exactness`` for the model's kernels). Imports torch;
never imported by the operator. Nothing here touches storage.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


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
