"""Example: a Hugging Face ``transformers.Trainer`` script with Phoenix's guarantees
(``phoenix-jobs[transformers]``).

A tiny GPT-2 built from its config (nothing is downloaded) learns the synthetic token
sequences of ``train_transformer.py`` (random crops and token dropout drawn in two worker
processes) with the Trainer's shuffling, dropout, AdamW, warmup + cosine, clipping and
gradient accumulation 2. The lines marked ``# phoenix`` resume it bit-exactly from the newest
valid checkpoint in S3 (the Trainer iterates Phoenix's loader, which seeds every batch's
fetch), checkpoint it asynchronously on the job's interval, and on SIGTERM save an emergency
checkpoint, write the termination message and exit 143 (docs/integrations.md).

    PHOENIX_CHECKPOINT_URI=file:///tmp/ckpt python examples/train_transformers.py --steps 40
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from phoenix_trainer import Session  # phoenix
from phoenix_trainer.integrations.transformers import PhoenixCallback  # phoenix
from train_transformer import TokenSequences, model_arguments, start

log = logging.getLogger("phoenix.example")


class CroppedSequences(TokenSequences):
    """The sequences as the Trainer wants them: a random crop with random token dropout."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seq = super().__getitem__(i)[: self.seq_len]
        return {"input_ids": seq, "labels": seq}


class StepLog(TrainerCallback):
    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step % self.every == 0:
            log.info("step %d epoch %.2f", state.global_step, state.epoch)


class Delay(TrainerCallback):
    """Sleeps before each optimizer step, so that tests can signal the process at a chosen step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        time.sleep(self.seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps to train")
    model_arguments(p)
    p.add_argument("--token-drop", type=float, default=0.1, help="random token dropout in the dataset")
    args = p.parse_args(argv)
    start(args)

    data = CroppedSequences(args.samples, args.seq_len, args.vocab, args.seed, args.token_drop)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.dim,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=args.dropout,
                        embd_pdrop=args.dropout, attn_pdrop=args.dropout, bos_token_id=0, eos_token_id=0)
    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-"), max_steps=args.steps, seed=args.seed,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.accumulate,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup,
        max_grad_norm=args.clip, weight_decay=0.01, dataloader_num_workers=args.workers,
        dataloader_drop_last=True, use_cpu=True, report_to="none", disable_tqdm=True,
        logging_strategy="no",
        save_strategy="no")  # phoenix: checkpoints go to S3 through the session
    run_config = {k: v for k, v in vars(args).items() if k not in ("step_delay", "log_every", "workers")}

    with Session(config=run_config) as session:  # phoenix: the env contract, SIGTERM handler
        phoenix = PhoenixCallback(session)  # phoenix
        callbacks = [phoenix, StepLog(args.log_every)]
        if args.step_delay:
            callbacks.append(Delay(args.step_delay))
        torch.manual_seed(args.seed)
        trainer = Trainer(GPT2LMHeadModel(config), training, train_dataset=data, callbacks=callbacks)
        # phoenix: the checkpoint to resume (None: start); with the trainer, Phoenix's loader
        trainer.train(resume_from_checkpoint=phoenix.restore(trainer))
    return phoenix.exit_code  # phoenix: 0, or 143 after a SIGTERM


if __name__ == "__main__":
    sys.exit(main())
