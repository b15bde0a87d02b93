"""Example Phoenix training script: a small MLP on a synthetic classification task.

Real enough to exercise every part of bit-exact resume (dropout, a shuffling loader via
ResumableShuffleSampler, AdamW, cosine LR schedule, gradient clipping, GradScaler) and small
enough to run a few hundred steps on CPU in seconds. Everything about where to checkpoint
comes from the PHOENIX_* environment (see docs/trainer.md); the flags only shape the model.

    PHOENIX_CHECKPOINT_URI=file:///tmp/ckpt python examples/train_mlp.py --steps 300
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from phoenix_trainer import (
    CheckpointPolicy, ReportingPolicy, ResumableShuffleSampler, Stage, StagedModule, Trainer,
)


class Sleep(nn.Module):
    """Slows each step down (tests use it to kill the process at a chosen step)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        if self.seconds:
            time.sleep(self.seconds)
        return x


def make_data(n: int, dim: int, classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed + 12345)
    x = torch.randn(n, dim, generator=g)
    teacher = torch.randn(dim, classes, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def build_model(dim: int, hidden: int, classes: int, dropout: float, step_delay: float) -> StagedModule:
    return StagedModule([
        Stage("embed", nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout))),
        Stage("block", nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                     Sleep(step_delay))),
        Stage("head", nn.Linear(hidden, classes)),
    ], restart_method="reload", max_retries=3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--epochs", type=int, default=None, help="stop after this many epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="override PHOENIX_CHECKPOINT_INTERVAL_STEPS")
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (seconds), for tests")
    p.add_argument("--no-emergency-checkpoint", action="store_true",
                   help="on SIGTERM, exit without the emergency checkpoint (to measure its worth)")
    p.add_argument("--out", default=None, help="write the final model state_dict here (torch.save)")
    args = p.parse_args(argv)
    if args.steps is None and args.epochs is None:
        args.epochs = 1

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        # Bitwise-identical resume on GPU needs deterministic kernels (set
        # CUBLAS_WORKSPACE_CONFIG=:4096:8 too); the CPU kernels this model uses already are, and
        # the switch costs seconds of start-up importing torch's compiler stack.
        torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    data = make_data(args.samples, args.dim, args.classes, args.seed)
    sampler = ResumableShuffleSampler(len(data), seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=0)
    model = build_model(args.dim, args.hidden, args.classes, args.dropout, args.step_delay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = min(x for x in (args.steps, (args.epochs or 0) * len(loader) or None) if x)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=args.lr * 0.01)
    scaler = torch.amp.GradScaler("cuda" if torch.cuda.is_available() else "cpu",
                                  enabled=torch.cuda.is_available())
    loss_fn = nn.CrossEntropyLoss()

    def step_loss(m, batch):
        x, y = batch
        return loss_fn(m(x), y)

    # Only what changes the math goes into the fingerprint (not --step-delay or --out).
    config = {k: v for k, v in vars(args).items()
              if k not in ("step_delay", "out", "log_every", "no_emergency_checkpoint")}
    trainer = Trainer(model, optimizer, loader, step_loss, scheduler=scheduler, scaler=scaler,
                      grad_clip_norm=args.clip, epochs=args.epochs, max_steps=args.steps,
                      config=config,
                      checkpoint=CheckpointPolicy(interval_steps=args.checkpoint_every,
                                                  emergency=not args.no_emergency_checkpoint),
                      reporting=ReportingPolicy(log_every=args.log_every))
    result = trainer.fit()
    if args.out and result.reason == "completed":
        torch.save(model.state_dict(), args.out)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
