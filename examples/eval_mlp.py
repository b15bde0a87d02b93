"""Evaluate what examples/train_mlp.py trained: the demo job's independent `eval` phase.

Loads the weights of the checkpoint in PHOENIX_INIT_FROM (the operator passes the train
phase's final checkpoint), measures loss and accuracy on held-out data drawn from the same
task, stores `eval.json` under this phase's checkpoint prefix (PHOENIX_CHECKPOINT_URI) and
writes a "completed" termination message. The model flags must match the training run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from phoenix_trainer.checkpoint import load_checkpoint
from phoenix_trainer.core.contract import TerminationMessage, TrainerEnv
from phoenix_trainer.core.layout import (
    latest_valid_checkpoint, split_checkpoint_uri, verify_checkpoint,
)
from phoenix_trainer.core.storage import open_storage
from train_mlp import build_model, make_data

log = logging.getLogger("phoenix.eval")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = TrainerEnv.from_env()
    if not env.init_from:
        TerminationMessage("failed", 0, None, False, "PHOENIX_INIT_FROM is not set: nothing to evaluate"
                           ).write(env.termination_log)
        return 1
    prefix, step = split_checkpoint_uri(env.init_from)
    store = open_storage(prefix)
    info = verify_checkpoint(store, step, deep=True) if step is not None else latest_valid_checkpoint(store)
    if info is None or not info.valid:
        reason = info.reason if info else "no checkpoint under that prefix"
        TerminationMessage("failed", 0, env.init_from, False, f"cannot evaluate: {reason}"
                           ).write(env.termination_log)
        return 1
    model = build_model(args.dim, args.hidden, args.classes, dropout=0.0, step_delay=0.0)
    model.load_state_dict(load_checkpoint(store, info)["model.pt"])
    model.eval()
    # Held-out data: same teacher (same seed), fresh inputs from a different generator stream.
    x, y = make_data(args.samples * 2, args.dim, args.classes, args.seed).tensors
    x, y = x[args.samples:], y[args.samples:]
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    result = {"checkpoint": info.uri, "step": info.step, "loss": round(loss, 5),
              "accuracy": round(accuracy, 5), "samples": len(y)}
    log.info("[%s] evaluated %s: loss %.4f accuracy %.3f", env.log_context, info.uri, loss, accuracy)
    if env.checkpoint_uri:
        open_storage(env.checkpoint_uri).put_bytes("eval.json", json.dumps(result).encode())
    TerminationMessage("completed", info.step, info.uri, False,
                       f"accuracy {accuracy:.3f}, loss {loss:.4f}").write(env.termination_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
