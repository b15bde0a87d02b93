"""What one checkpoint save costs the rest of the process: streamed into S3 vs spooled.

    python benchmarks/bench_stream_cost.py --out benchmarks/results/stream_cost.json

bench_checkpoint's throughput ratio moves by far more with a busy neighbour than with the
checkpoint, so this measures the save itself, in ways load hardly changes. The same CPU
snapshot of the bench_checkpoint MLP (model + AdamW + scheduler + RNG, ~76 MB) is saved
as the trainer does now ("streamed": torch.save into ``Storage.open_write``, S3 multipart
parts) and as it did before ("spooled": torch.save to a local file while hashing, then
``put_file``), interleaved, to a versitygw it starts in a temp dir:
  (a) CPU seconds per save: this process (all threads) and the S3 server, nothing else
      running; wall seconds;
  (b) GIL pressure: while the save runs in a thread, the main thread runs ~0.2 ms slices of
      pure Python (the worst case for a training loop, which releases the GIL inside torch
      ops); "stolen" = the seconds those slices took beyond their own median cost.
Never run by the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_checkpoint import build, local_s3  # noqa: E402
from phoenix_trainer.checkpoint import _hashing_save  # noqa: E402
from phoenix_trainer.core.storage.s3 import S3Storage  # noqa: E402
from phoenix_trainer.core.writer import StreamedShard, stream_object  # noqa: E402
from phoenix_trainer.determinism import capture_rng  # noqa: E402
from phoenix_trainer.tensors import to_cpu, tree_nbytes  # noqa: E402


def snapshot(steps: int = 5) -> dict:
    model, opt, sched, loader, loss_fn = build(1024, 1536, 3, 10**6, 32)
    for _, b in zip(range(steps), loader):  # AdamW state exists only after a step
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()
        sched.step()
    return {"model.pt": to_cpu(model.state_dict()), "optimizer.pt": to_cpu(opt.state_dict()),
            "scheduler.pt": sched.state_dict(), "rng.pt": capture_rng()}


def saver(storage: S3Storage, tensors: dict, spool: Path):
    def streamed(key: str) -> None:
        for name, obj in tensors.items():
            stream_object(storage, f"{key}/{name}", StreamedShard(
                lambda f, obj=obj: torch.save(obj, f), size_hint=tree_nbytes(obj)))
            storage.stat(f"{key}/{name}")

    def spooled(key: str) -> None:  # what AsyncCheckpointer did before 0b67e23
        for name, obj in tensors.items():
            path = spool / name
            _hashing_save(obj, str(path))
            storage.put_file(f"{key}/{name}", path)
            storage.stat(f"{key}/{name}")
            path.unlink()

    return {"streamed": streamed, "spooled": spooled}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/stream_cost.json")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tick = os.sysconf("SC_CLK_TCK")

    with tempfile.TemporaryDirectory(prefix="phoenix-bench-") as tmp, \
            local_s3(Path(tmp)) as (server, storage):
        tensors = snapshot()
        spool = Path(tmp) / "spool"
        spool.mkdir()
        saves = saver(storage, tensors, spool)
        spid = server.service._proc.pid

        def cpu() -> tuple[float, float]:
            t = os.times()
            f = Path(f"/proc/{spid}/stat").read_text().rsplit(")", 1)[1].split()
            return t.user + t.system, (int(f[11]) + int(f[12])) / tick

        def slice_() -> None:
            s = 0
            for i in range(2000):
                s += i

        runs: dict[str, list[dict]] = {v: [] for v in saves}
        for rep in range(-1, args.reps):  # rep -1 warms up connections and allocations
            for variant, save in saves.items():
                c0, t0 = cpu(), time.perf_counter()
                save(f"{variant}/cpu-{rep}")
                wall, c1 = time.perf_counter() - t0, cpu()
                th = threading.Thread(target=save, args=(f"{variant}/gil-{rep}",))
                lats: list[float] = []
                t1 = time.perf_counter()
                th.start()
                while th.is_alive():
                    s = time.perf_counter()
                    slice_()
                    lats.append(time.perf_counter() - s)
                th.join()
                if rep >= 0:
                    typical = statistics.median(lats)
                    runs[variant].append({
                        "wall_seconds": round(wall, 3),
                        "client_cpu_seconds": round(c1[0] - c0[0], 3),
                        "server_cpu_seconds": round(c1[1] - c0[1], 3),
                        "with_probe_wall_seconds": round(time.perf_counter() - t1, 3),
                        "probe_stolen_seconds": round(sum(x - typical for x in lats if x > typical), 3),
                    })

    result = {"benchmark": "stream_cost", "cpus": os.cpu_count(), "torch": torch.__version__,
              "checkpoint_bytes": sum(tree_nbytes(o) for o in tensors.values()),
              "loadavg": os.getloadavg(), "medians": {}, "runs": runs}
    for variant, rs in runs.items():
        result["medians"][variant] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("checkpoint_bytes", "loadavg", "medians")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
