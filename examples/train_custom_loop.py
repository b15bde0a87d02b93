"""Example: your own training loop with Phoenix's guarantees, through ``Session``.

Nothing of the loop is Phoenix's: a plain PyTorch loop (a small MLP, a shuffling
``DataLoader`` with worker processes and random noise in ``__getitem__``, dropout, AdamW,
cosine LR, clipping). The lines marked ``# phoenix`` are all it takes to resume exactly from
the newest valid checkpoint in S3, checkpoint asynchronously, and on SIGTERM save an
emergency checkpoint and exit 143 with the termination message (docs/trainer.md, "Bring
your own loop").

    PHOENIX_CHECKPOINT_URI=file:///tmp/ckpt python examples/train_custom_loop.py --steps 200
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
from torch.utils.data import DataLoader

from phoenix_trainer import Session, adapt_loader, capture_rng, restore_rng  # phoenix
from phoenix_trainer.testing import NoisyDataset

log = logging.getLogger("phoenix.example")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (seconds), for tests")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.samples, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    loader = DataLoader(NoisyDataset(x, y), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
    loader = adapt_loader(loader)  # phoenix: positions restored exactly (or it says why not)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    ce = nn.CrossEntropyLoss()
    step, epoch, batch = 0, 0, 0
    config = {k: v for k, v in vars(args).items() if k not in ("workers", "log_every", "step_delay")}

    with Session(config=config, exactness=loader.exactness) as session:  # phoenix
        restored = session.restore()  # phoenix: newest valid checkpoint (or None)
        if restored is not None and restored.kind == "resume":  # phoenix
            model.load_state_dict(restored["model.pt"])
            opt.load_state_dict(restored["optimizer.pt"])
            sched.load_state_dict(restored["scheduler.pt"])
            position = restored["data.json"]
            loader.load_state_dict(position["loader"])
            step, epoch, batch = restored.step, position["epoch"], position["batch"]
            restore_rng(restored["rng.pt"])
        session.started(step, epoch)  # phoenix

        def state() -> dict:  # phoenix: everything the loop needs to continue exactly
            return {"model.pt": model.state_dict(), "optimizer.pt": opt.state_dict(),
                    "scheduler.pt": sched.state_dict(), "rng.pt": capture_rng(),
                    "data.json": {"epoch": epoch, "batch": batch, "loader": loader.state_dict()}}

        while step < args.steps:
            for xb, yb in loader.epoch_iterator(epoch, batch):
                model.train()
                opt.zero_grad(set_to_none=True)
                loss = ce(model(xb), yb)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step, batch = step + 1, batch + 1
                if args.step_delay:
                    time.sleep(args.step_delay)
                if step % args.log_every == 0:
                    log.info("step %d epoch %d loss %.4f", step, epoch, loss.item())
                if session.stop_requested:  # phoenix: SIGTERM -> emergency checkpoint, exit 143
                    return session.finish("preempted", step, epoch=epoch, state=state).exit_code
                if session.should_checkpoint(step):  # phoenix: async; only the CPU copy blocks
                    session.save(step, state(), epoch=epoch)
                if step >= args.steps:
                    break
            else:
                epoch, batch = epoch + 1, 0
        return session.finish("completed", step, epoch=epoch, state=state).exit_code  # phoenix


if __name__ == "__main__":
    sys.exit(main())
