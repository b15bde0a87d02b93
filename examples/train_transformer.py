"""Example Phoenix training script: a small causal transformer LM, written the usual way.

The shape most real scripts have, and what Phoenix resumes bit-exactly (docs/trainer.md,
"Bit-exact resume"): a plain ``DataLoader(shuffle=True, generator=...)`` with worker
processes, a random transform inside the dataset (token dropout and a random crop, drawn
from the global RNGs in the worker), dropout, AdamW, linear warmup then cosine decay,
gradient clipping and gradient accumulation. ``--loader sampler`` uses the runtime's
``ResumableShuffleSampler`` instead; both resume exactly. Synthetic data, CPU in seconds.

    PHOENIX_CHECKPOINT_URI=file:///tmp/ckpt python examples/train_transformer.py --steps 60
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from phoenix_trainer import (
    CheckpointPolicy, DataPolicy, ReportingPolicy, ResumableShuffleSampler, Trainer,
)


class TokenSequences(Dataset):
    """Fixed synthetic token sequences; each fetch crops and drops tokens at random."""

    def __init__(self, samples: int, seq_len: int, vocab: int, seed: int, drop: float) -> None:
        g = torch.Generator().manual_seed(seed + 4242)
        # A learnable pattern: each token mostly follows from the previous one.
        table = torch.randint(0, vocab, (vocab,), generator=g)
        start = torch.randint(0, vocab, (samples,), generator=g)
        seqs = [start]
        for _ in range(seq_len + 3):
            noise = torch.randint(0, vocab, (samples,), generator=g)
            keep = torch.rand(samples, generator=g) < 0.8
            seqs.append(torch.where(keep, table[seqs[-1]], noise))
        self.data = torch.stack(seqs, dim=1)  # (samples, seq_len + 4)
        self.seq_len, self.vocab, self.drop = seq_len, vocab, drop

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        off = random.randint(0, self.data.shape[1] - self.seq_len - 1)  # python RNG
        seq = self.data[i, off:off + self.seq_len + 1].clone()
        mask = torch.rand(self.seq_len) < self.drop  # torch RNG
        seq[:-1][mask] = 0  # token 0 doubles as the "dropped" token
        return seq


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, seq_len: int,
                 dropout: float, step_delay: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len),
                             persistent=False)
        self.step_delay = step_delay

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.step_delay:
            time.sleep(self.step_delay)  # tests use it to kill the process at a chosen step
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        n = tokens.shape[1]
        return self.head(self.blocks(x, mask=self.mask[:n, :n], is_causal=True))


def warmup_cosine(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def model_arguments(p: argparse.ArgumentParser) -> None:
    """Model, data and optimizer flags; the Lightning and transformers examples share them."""
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per forward (seconds), for tests")


def start(args: argparse.Namespace) -> None:
    """Logging to stderr, every global RNG seeded, torch's threads from OMP_NUM_THREADS."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps to train")
    p.add_argument("--epochs", type=int, default=None)
    model_arguments(p)
    p.add_argument("--token-drop", type=float, default=0.1, help="random token dropout in the dataset")
    p.add_argument("--loader", choices=("shuffle", "sampler"), default="shuffle",
                   help="shuffle: DataLoader(shuffle=True, generator=g); sampler: ResumableShuffleSampler")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="override PHOENIX_CHECKPOINT_INTERVAL_STEPS")
    args = p.parse_args(argv)
    if args.steps is None and args.epochs is None:
        args.epochs = 2
    start(args)

    data = TokenSequences(args.samples, args.seq_len, args.vocab, args.seed, args.token_drop)
    if args.loader == "shuffle":
        loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                            num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
    else:
        loader = DataLoader(data, batch_size=args.batch_size, drop_last=True, num_workers=args.workers,
                            sampler=ResumableShuffleSampler(len(data), seed=args.seed))
    model = TinyLM(args.vocab, args.dim, args.heads, args.layers, args.seq_len, args.dropout,
                   args.step_delay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(loader) / args.accumulate)
    total = min(x for x in (args.steps, (args.epochs or 0) * steps_per_epoch or None) if x)
    scheduler = warmup_cosine(optimizer, args.warmup, total)
    ce = nn.CrossEntropyLoss()

    def step_loss(m, tokens):
        logits = m(tokens[:, :-1])
        return ce(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    # Only what changes the math goes into the fingerprint (workers do not: see the docs).
    config = {k: v for k, v in vars(args).items() if k not in ("step_delay", "log_every", "workers")}
    trainer = Trainer(model, optimizer, loader, step_loss, scheduler=scheduler, grad_clip_norm=args.clip,
                      epochs=args.epochs, max_steps=args.steps, config=config,
                      data=DataPolicy(accumulate_grad_batches=args.accumulate),
                      checkpoint=CheckpointPolicy(interval_steps=args.checkpoint_every),
                      reporting=ReportingPolicy(log_every=args.log_every))
    return trainer.fit().exit_code


if __name__ == "__main__":
    sys.exit(main())
