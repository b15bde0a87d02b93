"""Example: a PyTorch Lightning script with Phoenix's guarantees (``phoenix-jobs[lightning]``).

The model and data of ``train_transformer.py`` (a small causal transformer LM built from
its config, synthetic token sequences with random crops and token dropout drawn in two
shuffling worker processes, dropout, AdamW, warmup + cosine, clipping, accumulation 2),
written as a ``LightningModule`` and trained by ``lightning.Trainer``. The lines marked
``# phoenix`` resume it bit-exactly from the newest valid checkpoint in S3, checkpoint it
asynchronously on the job's interval, and on SIGTERM save an emergency checkpoint, write
the termination message and exit 143 (docs/integrations.md).

    PHOENIX_CHECKPOINT_URI=file:///tmp/ckpt python examples/train_lightning.py --steps 40
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from phoenix_trainer import Session  # phoenix
from phoenix_trainer.integrations.lightning import PhoenixCallback, PhoenixLoader  # phoenix
from train_transformer import TinyLM, TokenSequences, model_arguments, start, warmup_cosine

log = logging.getLogger("phoenix.example")


class LitLM(L.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.lm = TinyLM(args.vocab, args.dim, args.heads, args.layers, args.seq_len, args.dropout,
                         args.step_delay)
        self.ce = nn.CrossEntropyLoss()
        self._logged_step = -1

    def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.lm(tokens[:, :-1])
        loss = self.ce(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        self._loss = loss.detach()
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.trainer.global_step
        if step != self._logged_step and step % self.args.log_every == 0 and step:
            self._logged_step = step
            log.info("step %d epoch %d loss %.4f", step, self.current_epoch, self._loss.item())

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.args.lr, weight_decay=0.01)
        sched = warmup_cosine(opt, self.args.warmup, self.args.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps to train")
    model_arguments(p)
    p.add_argument("--token-drop", type=float, default=0.1, help="random token dropout in the dataset")
    args = p.parse_args(argv)
    start(args)

    data = TokenSequences(args.samples, args.seq_len, args.vocab, args.seed, args.token_drop)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
    model = LitLM(args)
    config = {k: v for k, v in vars(args).items() if k not in ("step_delay", "log_every", "workers")}

    with Session(config=config) as session:  # phoenix: the env contract, SIGTERM handler
        phoenix = PhoenixCallback(session)  # phoenix
        trainer = L.Trainer(
            max_steps=args.steps, accelerator="cpu", devices=1, accumulate_grad_batches=args.accumulate,
            gradient_clip_val=args.clip, callbacks=[phoenix],  # phoenix
            enable_checkpointing=False, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tempfile.gettempdir())
        # phoenix: the loader's position is checkpointed; ckpt_path is the checkpoint to resume
        trainer.fit(model, PhoenixLoader(loader), ckpt_path=phoenix.restore())
    return phoenix.exit_code  # phoenix: 0, or 143 after a SIGTERM (raised inside fit)


if __name__ == "__main__":
    sys.exit(main())
