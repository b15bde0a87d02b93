"""Small deterministic training setups for tests, the demo and benchmarks.

A FlakyLayer that fails sporadically (from its own RNG, so it never disturbs the training
RNG streams), a NoisyDataset whose every fetch draws from all three global RNGs (a random
transform, as augmentation does), and ``tiny_setup`` that builds a complete, seeded run:
dropout, a shuffling loader (ResumableShuffleSampler or ``shuffle=True``, optionally with
worker processes), AdamW, cosine LR and gradient clipping. Never used by the runtime itself.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .core.errors import TransientError
from .samplers import ResumableShuffleSampler
from .stages import Stage, StagedModule
from .trainer import Callback


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


class NoisyDataset(Dataset):
    """(x + noise, y) where the noise comes from torch's, python's and numpy's global RNGs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, scale: float = 0.05) -> None:
        self.x, self.y, self.scale = x, y, scale

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        noise = torch.randn(self.x.shape[1]) + random.random() + float(np.random.rand())
        return self.x[i] + self.scale * noise, self.y[i]


def make_loader(data: Dataset, *, kind: str = "sampler", batch_size: int = 16, workers: int = 0,
                seed: int = 0, drop_last: bool = True) -> DataLoader:
    """``kind``: "sampler" (ResumableShuffleSampler), "shuffle" (shuffle=True with a seeded
    generator), "shuffle-global" (shuffle=True, no generator: draws from the global RNG)."""
    if kind == "sampler":
        return DataLoader(data, batch_size=batch_size, sampler=ResumableShuffleSampler(len(data), seed=seed),
                          drop_last=drop_last, num_workers=workers)
    gen = torch.Generator().manual_seed(seed) if kind == "shuffle" else None
    if kind not in ("shuffle", "shuffle-global"):
        raise ValueError(f"unknown loader kind {kind!r}")
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen, drop_last=drop_last,
                      num_workers=workers)


@dataclass
class TinyRun:
    model: StagedModule
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: DataLoader
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
               numpy_noise: bool = True, loader: str = "sampler", workers: int = 0,
               noisy: bool = False) -> TinyRun:
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed + 99)
    x = torch.randn(samples, dim, generator=g)
    y = (x @ torch.randn(dim, classes, generator=g)).argmax(1)
    data = NoisyDataset(x, y) if noisy else TensorDataset(x, y)
    train_loader = make_loader(data, kind=loader, batch_size=batch_size, workers=workers, seed=seed)
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
              "classes": classes, "dropout": dropout, "lr": lr, "total_steps": total_steps,
              "loader": loader, "noisy": noisy}
    return TinyRun(model, optimizer, scheduler, train_loader, loss_fn, config, flaky)


class StopAt(Callback):
    """A ``Trainer`` callback that simulates SIGTERM arriving during step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Any, loss: Any) -> None:
        if trainer.step == self.step:
            trainer.request_stop()


def state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
