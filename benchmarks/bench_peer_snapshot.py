"""What an in-place gang's peer snapshot (rejoin.PeerState) costs the training loop per step.

    python benchmarks/bench_peer_snapshot.py --out benchmarks/results/peer_snapshot.json

Two ranks (gloo on CPU, processes spawned here) train the example's DDP model
(examples/train_distributed.py's layers) with and without a peer snapshot at every step
boundary (PHOENIX_PEER_SNAPSHOT_STEPS=1, the default), interleaved in blocks, for each model
width; reports the median step time of each and their ratio, and the snapshot's own median
seconds (all_gather of the per-rank entries + torch.save to a tmpfs-like directory). The
snapshot writes model + AdamW state (3x the parameters) every step: its cost grows with the
state, the step's with the compute. Never run by the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))


def _rank(rank: int, world: int, port: int, widths: list[int], steps: int, blocks: int,
          out: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from phoenix_trainer.determinism import capture_rng
    from phoenix_trainer.distributed import GroupPeers, exact_allreduce_hook
    from phoenix_trainer.rejoin import PeerState

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    peers = GroupPeers(60)
    results = []
    for hidden in widths:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(
            nn.Linear(16, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 4)))
        model.register_comm_hook(None, exact_allreduce_hook)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
            snaps = PeerState(peers, os.path.join(d, f"r{rank}"), every=1)

            def state() -> dict:
                msd, osd = get_state_dict(model, opt)
                return {"sharded": {"model": msd, "optim": osd}, "rng.pt": capture_rng(),
                        "data.json": {"samplesSeen": 0}}

            times: dict[str, list[float]] = {"off": [], "on": []}
            step = 0
            for block in range(blocks * 2):
                mode = ("off", "on")[block % 2]
                for _ in range(steps):
                    t0 = time.perf_counter()
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                    step += 1
                    peers.agree(step, lambda: (False, False))
                    if mode == "on":
                        snaps.snapshot(step, state, {"configFingerprint": "b", "phase": "train"})
                    times[mode].append(time.perf_counter() - t0)
        nparams = sum(p.numel() for p in model.parameters())
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        results.append({"hidden": hidden, "params": nparams, "stateMB": round(nparams * 12 / 1e6, 3),
                        "stepSecondsOff": round(off, 6), "stepSecondsOn": round(on, 6),
                        "ratio": round(on / off, 3),
                        "snapshotSecondsMedian": round(statistics.median(snaps.seconds), 6)})
    if rank == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"world": world, "results": results}, indent=2))
        print(json.dumps(results, indent=2))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/peer_snapshot.json")
    p.add_argument("--widths", default="64,1024")
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--blocks", type=int, default=3, help="blocks of each mode, interleaved")
    args = p.parse_args()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    widths = [int(w) for w in args.widths.split(",")]
    mp.spawn(_rank, args=(2, port, widths, args.steps, args.blocks, args.out), nprocs=2)


if __name__ == "__main__":
    main()
