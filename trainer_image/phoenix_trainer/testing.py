"""Small deterministic training setups for tests, the demo and benchmarks.

A FlakyLayer that fails sporadically (from its own RNG, so it never disturbs the training
RNG streams) and ``tiny_setup`` that builds a complete, seeded run: dropout, a shuffling
loader over ResumableShuffleSampler, AdamW, cosine LR and gradient clipping. Never used by
the runtime itself.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .errors import TransientError
from .stages import Stage, StagedModule
from .state import ResumableShuffleSampler


class FlakyError(TransientError, RuntimeError):
    """A sporadic failure, e.g. an ECC blip or a flaky collective, that a retry fixes."""


class FlakyLayer(nn.Module):
    """Identity that raises FlakyError with probability ``rate`` per forward (or on listed calls)."""

    def __init__(self, rate: float = 0.0, seed: int = 1234, fail_on_calls: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.rate = rate
        self.rng = random.Random(seed)  # private: must not consume the training RNG streams
        self.fail_on_calls = set(fail_on_calls)
        self.calls = 0
        self.failures = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if (self.calls in self.fail_on_calls) or (self.rate and self.rng.random() < self.rate):
            self.failures += 1
            raise FlakyError(f"flaky layer hiccup on call {self.calls}")
        return x


@dataclass
class TinyRun:
    model: StagedModule
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: DataLoader
    sampler: ResumableShuffleSampler
    loss_fn: Any
    config: dict
    flaky: FlakyLayer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tiny_setup(*, seed: int = 0, samples: int = 128, batch_size: int = 16, dim: int = 8,
               hidden: int = 32, classes: int = 4, dropout: float = 0.2, lr: float = 1e-2,
               total_steps: int = 40, flaky_rate: float = 0.0, fail_on_calls: tuple[int, ...] = (),
               restart_method: str = "reload", max_retries: int = 3,
               numpy_noise: bool = True) -> TinyRun:
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed + 99)
    x = torch.randn(samples, dim, generator=g)
    y = (x @ torch.randn(dim, classes, generator=g)).argmax(1)
    data = TensorDataset(x, y)
    sampler = ResumableShuffleSampler(samples, seed=seed)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)
    flaky = FlakyLayer(flaky_rate, seed=seed + 7, fail_on_calls=fail_on_calls)
    model = StagedModule([
        Stage("embed", nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))),
        Stage("flaky", flaky),
        Stage("head", nn.Linear(hidden, classes)),
    ], restart_method=restart_method, max_retries=max_retries)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    ce = nn.CrossEntropyLoss()

    def loss_fn(m, batch):
        xb, yb = batch
        loss = ce(m(xb), yb)
        if numpy_noise:
            # Touch python and numpy RNGs too, so a test fails if their state is not restored.
            loss = loss + 1e-6 * float(np.random.rand()) + 1e-6 * random.random()
        return loss

    config = {"seed": seed, "samples": samples, "batch": batch_size, "dim": dim, "hidden": hidden,
              "classes": classes, "dropout": dropout, "lr": lr, "total_steps": total_steps}
    return TinyRun(model, optimizer, scheduler, loader, sampler, loss_fn, config, flaky)


def state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
