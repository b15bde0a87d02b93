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


class BlockingDataset(torch.utils.data.Dataset):
    """``inner``, except that once ``flag`` exists every item blocks for ever: a DataLoader
    worker deadlocked (tests use it, with ``--hang worker``)."""

    def __init__(self, inner, flag: str) -> None:
        self.inner, self.flag = inner, flag

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        if os.path.exists(self.flag):
            worker_waits_for_ever()
        return self.inner[i]


def worker_waits_for_ever() -> None:
    import threading
    threading.Event().wait()


def storage_call_that_never_returns() -> None:
    """A GET from an S3 endpoint that accepts the connection and never answers."""
    import socket

    import boto3
    from botocore.config import Config

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                      aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1",
                      config=Config(read_timeout=3600, connect_timeout=5, retries={"max_attempts": 1}))
    s3.get_object(Bucket="data", Key="shard-0")


class HangAt:
    """Injects a hang ``steps`` steps into each of the first ``attempts`` attempts (tests and
    benchmarks of hang detection): ``worker`` (the DataLoader worker blocks for ever),
    ``storage`` (a storage call never returns), ``loop`` (the loop waits for ever)."""

    def __init__(self, steps: int, kind: str, flag: str, attempts: int = 1) -> None:
        self.steps, self.kind, self.flag, self.attempts = steps, kind, flag, attempts
        self.step: int | None = None

    def on_start(self, trainer) -> None:
        self.step = trainer.step + self.steps

    def on_epoch_end(self, trainer, epoch) -> None: ...
    def on_checkpoint(self, trainer, info) -> None: ...
    def on_end(self, trainer, result) -> None: ...

    def on_step_end(self, trainer, loss) -> None:
        if trainer.step != self.step or int(os.environ.get("PHOENIX_ATTEMPT", "1")) > self.attempts:
            return
        logging.getLogger("train_mlp").warning("injecting a %s hang at step %d", self.kind, self.step)
        if self.kind == "worker":
            open(self.flag, "w").close()
        elif self.kind == "storage":
            storage_call_that_never_returns()
        elif self.kind == "loop":
            worker_waits_for_ever()


class Pauses:
    """``--pause-at-start`` and ``--eval-every``: long stretches without a step that are not
    hangs (a slow restore, an evaluation between steps)."""

    def __init__(self, at_start: float, every: int | None, seconds: float) -> None:
        self.at_start, self.every, self.seconds = at_start, every, seconds

    def on_start(self, trainer) -> None:
        if self.at_start:
            logging.getLogger("train_mlp").info("pausing %.0fs before the first step", self.at_start)
            time.sleep(self.at_start)

    def on_step_end(self, trainer, loss) -> None:
        if self.every and trainer.step % self.every == 0:
            logging.getLogger("train_mlp").info("evaluating for %.0fs at step %d", self.seconds,
                                                trainer.step)
            time.sleep(self.seconds)

    def on_epoch_end(self, trainer, epoch) -> None: ...
    def on_checkpoint(self, trainer, info) -> None: ...
    def on_end(self, trainer, result) -> None: ...


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
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--hang-at", type=int, default=None,
                   help="inject a hang this many steps into an attempt (tests)")
    p.add_argument("--hang", choices=["worker", "storage", "loop"], default="loop")
    p.add_argument("--hang-attempts", type=int, default=1, help="in the first N attempts")
    p.add_argument("--pause-at-start", type=float, default=0.0,
                   help="sleep this long after the restore, before the first step (a slow start-up"
                        " or restore; tests of the hang rule)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="every N steps, pause --eval-seconds between steps (an evaluation)")
    p.add_argument("--eval-seconds", type=float, default=30.0)
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
    flag = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"phoenix-hang-{os.getpid()}")
    if args.hang_at is not None and args.hang == "worker":
        data = BlockingDataset(data, flag)
    sampler = ResumableShuffleSampler(len(data), seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.workers)
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
              if k not in ("step_delay", "out", "log_every", "no_emergency_checkpoint", "workers",
                           "hang_at", "hang", "hang_attempts", "pause_at_start", "eval_every",
                           "eval_seconds")}
    trainer = Trainer(model, optimizer, loader, step_loss, scheduler=scheduler, scaler=scaler,
                      grad_clip_norm=args.clip, epochs=args.epochs, max_steps=args.steps,
                      config=config,
                      checkpoint=CheckpointPolicy(interval_steps=args.checkpoint_every,
                                                  emergency=not args.no_emergency_checkpoint),
                      reporting=ReportingPolicy(log_every=args.log_every),
                      callbacks=([HangAt(args.hang_at, args.hang, flag, args.hang_attempts)]
                                 if args.hang_at is not None else [])
                      + ([Pauses(args.pause_at_start, args.eval_every, args.eval_seconds)]
                         if args.pause_at_start or args.eval_every else []))
    result = trainer.fit()
    if args.out and result.reason == "completed":
        torch.save(model.state_dict(), args.out)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
