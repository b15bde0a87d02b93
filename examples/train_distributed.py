"""Example: data-parallel training under torchrun (DDP or FSDP2), one checkpoint for all ranks.

Every rank runs this script (``torchrun --nproc-per-node=N``; on a PhoenixJob with
``replicas`` the operator sets torchrun's PET_* environment, so the command stays plain
``torchrun train.py``). ``DistributedSession`` makes the ranks agree at each step whether to
stop or checkpoint, writes one sharded checkpoint (torch.distributed.checkpoint: each rank
its own shard; one manifest, last, listing every rank's files) and resumes all ranks from
the newest checkpoint valid for all of them — on the same or a different number of ranks.

The data position is global: step k trains on samples [k*B, (k+1)*B) of the epoch's
permutation (B the global batch), each rank taking every world_size-th of them, so a
resume on another world size sees exactly the same samples (not bitwise the same numbers:
each rank's dropout stream is its own).

    torchrun --nproc-per-node=2 examples/train_distributed.py --mode fsdp --steps 40
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
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from phoenix_trainer import capture_rng, restore_rng
from phoenix_trainer.distributed import DistributedSession, exact_allreduce_hook, init_from_env

log = logging.getLogger("phoenix.example")


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def rank_stops_before_its_collective() -> None:
    import threading
    threading.Event().wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (seconds), for tests")
    p.add_argument("--preempt-at", type=int, default=None,
                   help="act as if SIGTERM reached every rank at this step (tests)")
    p.add_argument("--hang-at", type=int, default=None,
                   help="at this step of attempt 1, --hang-rank blocks for ever before its next "
                        "collective while the other ranks wait in it (tests)")
    p.add_argument("--hang-rank", type=int, default=1)
    p.add_argument("--slow-node", default=None,
                   help="every rank running on this node (env NODE_NAME, from the downward API)"
                        " sleeps --slow-seconds before each step's forward: a slow node (tests)")
    p.add_argument("--slow-rank", type=int, default=None,
                   help="this rank sleeps --slow-seconds before each step's forward: a straggler (tests)")
    p.add_argument("--slow-seconds", type=float, default=0.2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_from_env()  # gloo on CPU, NCCL on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the {world} ranks")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.samples, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    model = nn.Sequential(nn.Linear(16, args.hidden), nn.GELU(), nn.Dropout(0.1),
                          nn.Linear(args.hidden, args.hidden), nn.GELU(), nn.Linear(args.hidden, 4))
    if args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        model = fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
        # Bit-exact resume with more than 2 ranks: see exact_allreduce_hook.
        model.register_comm_hook(None, exact_allreduce_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed * 1000 + rank)  # each rank its own dropout stream
    ce = nn.CrossEntropyLoss()
    config = {k: v for k, v in vars(args).items()
              if k not in ("log_every", "step_delay", "preempt_at", "hang_at", "hang_rank",
                           "slow_rank", "slow_seconds", "slow_node")}
    step, seen = 0, 0  # seen: samples consumed by all ranks together (the data position)

    def state() -> dict:
        msd, osd = get_state_dict(model, opt)
        return {"sharded": {"model": msd, "optim": osd}, "rng.pt": capture_rng(),
                "data.json": {"samplesSeen": seen, "worldSize": world}}

    # state=: an in-place gang (gangRestart: Member) keeps it in its peers' memory at every step
    # boundary, so a replaced member resumes from the step the survivors reached.
    with DistributedSession(config=config, state=state) as session:
        restored = session.restore()
        if restored is not None:
            msd, osd = get_state_dict(model, opt)
            restored.load_sharded({"model": msd, "optim": osd})
            set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
            if restored["data.json"]["worldSize"] == world:
                restore_rng(restored["rng.pt"])  # another world size: fresh per-rank streams
            step, seen = restored.step, restored["data.json"]["samplesSeen"]
        session.started(step)

        per_epoch = args.samples // args.global_batch
        while step < args.steps:
            epoch, k = divmod(seen // args.global_batch, per_epoch)
            idx = permutation(args.samples, args.seed, epoch)[k * args.global_batch:(k + 1) * args.global_batch]
            mine = idx[rank::world]
            if (step == args.hang_at and rank == args.hang_rank
                    and os.environ.get("PHOENIX_ATTEMPT", "1") == "1"):
                log.warning("rank %d: injecting a hang before step %d's collective", rank, step + 1)
                rank_stops_before_its_collective()
            if rank == args.slow_rank or (args.slow_node and os.environ.get("NODE_NAME") == args.slow_node):
                time.sleep(args.slow_seconds)  # a slow node: compute before the collective
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = ce(model(x[mine]), y[mine])
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + args.global_batch
            if args.step_delay:
                time.sleep(args.step_delay)
            if step % args.log_every == 0:  # the global batch's mean loss, from every rank
                mean = loss.detach().clone()
                dist.all_reduce(mean, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
                if dist.get_backend() != "nccl":
                    mean /= world
                if rank == 0:
                    log.info("step %d loss %.5f", step, mean.item())
            if step == args.preempt_at:
                session.request_stop()
            if session.should_stop(step):
                return session.finish("preempted", step, state=state).exit_code
            if session.should_checkpoint(step):
                session.save(step, state())
        result = session.finish("completed", step, state=state)
    dist.destroy_process_group()
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
