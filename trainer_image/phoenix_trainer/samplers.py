"""A resumable shuffling sampler whose permutation depends only on (seed, epoch), so a resumed
run sees the same batches in the same order. Imports torch; never imported by the operator.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


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
