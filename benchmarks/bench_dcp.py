"""Gang checkpoint benchmark: an FSDP2 gang (2 processes, gloo on CPU) saving and restoring
its sharded state through S3, today's path against the one in this tree, in the same run.

    python benchmarks/bench_dcp.py --state-mb 1024 --rounds 3 --out benchmarks/results/dcp.json

Starts its own S3 server (versitygw, loopback). Each round runs, for each variant, one gang
(``torchrun --nproc-per-node 2`` of this file as ``--worker``) with a ``DistributedSession``:
  old   the trainer of ``--old-rev`` (default ``main``, from ``git archive``): ``dcp.save``
        into the local spool on the training thread, uploaded afterwards; the restore
        downloads every DCP file to a temp dir on every rank;
  new   this tree: the sharded state staged into reused CPU buffers on the training thread,
        written by DCP straight to S3 from the upload thread (dcp_storage.py); the restore
        reads only the blocks the rank's load plan needs.
The model is a stack of 4096x4096 linear layers, fully sharded, with AdamW state: about
``--state-mb`` of model + optimizer state over the gang. Every rank measures:
  blocked     seconds ``session.save`` held the loop, for each of ``--saves`` saves (each
              after the previous upload finished; the first one allocates the staging
              buffers, so it is reported apart);
  copy        seconds to copy the rank's state once in memory into preallocated tensors
              (the floor any snapshot pays); the goal is blocked <= 1.5x copy;
  restore     a second gang of the same variant resumes: seconds from ``session.restore()``
              to the state loaded, and the bytes it read of the DCP objects over the bytes of
              its own DCP shard (old: every DCP file, by construction);
  equal       the restored weights and optimizer state equal the saved ones;
  step        seconds per training step with no save in flight, and while the background
              save runs on the same process (what its serialization, hashing and upload
              cost the loop: the case for a process-based async save).
The parent watches the spool directory throughout (peak bytes; goal 0 for new).
Medians over rounds and ranks. Never run by the test suite.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MiB = 1 << 20
VARIANTS = ("old", "new")
WIDTH = 4096


# -- the worker (one rank, under torchrun) ----------------------------------------------------

def _digest(state) -> str:
    """sha256 over the rank's local tensors, in key order (equal states, equal digests)."""
    import torch
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()

    def walk(obj, path=""):
        if isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}/{i}")
        elif isinstance(obj, torch.Tensor):
            t = obj.to_local() if isinstance(obj, DTensor) else obj
            h.update(path.encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
        else:
            h.update(f"{path}={obj!r}".encode())
    walk(state)
    return h.hexdigest()


def worker(args) -> int:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from phoenix_trainer.distributed import DistributedSession, init_from_env

    torch.set_num_threads(1)
    init_from_env("gloo")
    rank = dist.get_rank()
    layers = max(1, round(args.state_mb * MiB / 3 / (WIDTH * WIDTH * 4)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step():
        opt.zero_grad(set_to_none=True)
        model(torch.randn(2, WIDTH)).sum().backward()
        opt.step()

    def state():
        msd, osd = get_state_dict(model, opt)
        return {"sharded": {"model": msd, "optim": osd}}

    out: dict = {"rank": rank, "layers": layers}
    with DistributedSession(config={"bench": "dcp", "layers": layers}) as session:
        t0 = time.perf_counter()  # the restore: finding, reading and loading the checkpoint
        restored = session.restore()
        if args.mode == "restore":
            assert restored is not None, "nothing to restore"
            msd, osd = get_state_dict(model, opt)
            target = {"model": msd, "optim": osd}
            restored.load_sharded(target)
            set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
            out["restore_seconds"] = time.perf_counter() - t0
            out["bytes_read"] = getattr(restored, "bytes_read", None)
            out["digest"] = _digest(state()["sharded"])
            session.started(restored.step)
            session.finish("completed", restored.step)
        else:
            session.started(0)
            train_step()
            local = [t.to_local() if isinstance(t, DTensor) else t
                     for part in state()["sharded"].values() for t in _tensors(part)]
            spare = [torch.empty_like(t) for t in local]
            out["state_bytes"] = sum(t.numel() * t.element_size() for t in local)
            copies = []
            for _ in range(3):
                t0 = time.perf_counter()
                for dst, src in zip(spare, local):
                    dst.copy_(src)
                copies.append(time.perf_counter() - t0)
            out["copy_seconds"] = statistics.median(copies)
            del spare
            blocked, step = [], 0
            ck = session.checkpointing
            idle, during = [], []  # step seconds without a save in flight, and with one

            def timed_step(into):
                t0 = time.perf_counter()
                train_step()
                into.append(time.perf_counter() - t0)

            for _ in range(3):
                timed_step(idle)
            for _ in range(args.saves):
                train_step()
                step += 1
                out["digest"] = _digest(state()["sharded"])  # what this save holds
                dist.barrier()
                t0 = time.perf_counter()
                session.save(step, state())
                blocked.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                # Train on while it uploads (the loop's cost of the background save: GIL and
                # CPU); both ranks stop together, when both uploads are done.
                while session.peers.all(ck.checkpointer.in_flight() > 0):
                    timed_step(during)
                ck.checkpointer.wait()
                out.setdefault("upload_seconds", []).append(time.perf_counter() - t0)
                for _ in range(2):
                    timed_step(idle)
            out["step_seconds_idle"] = statistics.median(idle)
            out["step_seconds_during_upload"] = statistics.median(during) if during else None
            out["blocked_seconds"] = blocked
            session.finish("completed", step)
    print("BENCH " + json.dumps(out), flush=True)
    dist.destroy_process_group()
    return 0


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# -- the parent -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpoolWatch:
    """Peak bytes of files under ``root`` while running."""

    def __init__(self, root: Path) -> None:
        self.root, self.peak, self.stop = root, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for d, _, names in os.walk(self.root):
                for n in names:
                    try:
                        total += os.path.getsize(os.path.join(d, n))
                    except OSError:
                        pass
            self.peak = max(self.peak, total)
            self.stop.wait(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_gang(variant: str, mode: str, uri: str, attempt: int, env: dict, args, tree: Path,
             tmp: Path) -> list[dict]:
    spool = tmp / f"spool-{variant}-{mode}"
    spool.mkdir(exist_ok=True)
    genv = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "AWS_"))}
    genv.update(env)
    genv.update({"PYTHONPATH": os.pathsep.join([str(tree), str(ROOT / "lab")]),
                 "PHOENIX_CHECKPOINT_URI": uri, "PHOENIX_ATTEMPT": str(attempt),
                 "PHOENIX_PHASE": "train", "PHOENIX_JOB_NAME": "bench-dcp",
                 "PHOENIX_JOB_NAMESPACE": "bench", "PHOENIX_SPOOL_DIR": str(spool),
                 "PHOENIX_TERMINATION_LOG": str(tmp / f"term-{variant}-{mode}-{attempt}"),
                 "PHOENIX_COLLECTIVE_TIMEOUT_SECONDS": "600", "OMP_NUM_THREADS": "1",
                 "TMPDIR": str(spool)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__, "--worker",
           "--mode", mode, "--state-mb", str(args.state_mb), "--saves", str(args.saves)]
    with SpoolWatch(spool) as watch:
        proc = subprocess.run(cmd, env=genv, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{variant} {mode} gang failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    for r in rows:
        r["spool_peak_bytes"] = watch.peak
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/dcp.json")
    ap.add_argument("--state-mb", type=int, default=1024, help="model + optimizer state, MiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--old-rev", default="main")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("save", "restore"), default="save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    sys.path[:0] = [str(ROOT / "trainer_image"), str(ROOT / "lab"), str(HERE)]
    from benchgit import commit_of, old_tree
    from benchstats import summary
    from phoenix_lab.s3 import S3Server
    from phoenix_trainer.core.layout import latest_valid_checkpoint
    from phoenix_trainer.core.storage.s3 import S3Storage

    variants = args.variants.split(",")
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "config": {k: v for k, v in vars(args).items() if k not in ("worker", "mode")},
                     "variants": {}}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-dcp-") as tmp:
        tmpp = Path(tmp)
        trees = {"old": old_tree(args.old_rev, tmpp), "new": ROOT / "trainer_image"}
        results["config"]["old_commit"] = commit_of(args.old_rev)
        server = S3Server(tmpp / "s3")
        ep = server.start()
        try:
            server.ensure_bucket("bench")
            env = ep.env()
            for r in range(args.rounds):
                for v in variants:  # interleaved: drift on a shared machine hits both alike
                    prefix = f"{v}-{r}"
                    uri = f"s3://bench/{prefix}"
                    saved = run_gang(v, "save", uri, 0, env, args, trees[v], tmpp)
                    loaded = run_gang(v, "restore", uri, 1, env, args, trees[v], tmpp)
                    storage = S3Storage("bench", prefix, endpoint_url=ep.url,
                                        access_key=ep.access_key, secret_key=ep.secret_key,
                                        region=ep.region)
                    info = latest_valid_checkpoint(storage, deep=False)
                    files = info.manifest.files
                    for s in saved:
                        l = next(x for x in loaded if x["rank"] == s["rank"])
                        own = files[f"dcp-__{s['rank']}_0.distcp"].size
                        every = sum(e.size for n, e in files.items() if n.startswith("dcp-"))
                        # today's restore downloads every DCP file on every rank
                        read = l["bytes_read"] if v == "new" else every
                        runs[v].append({**s, "restore_seconds": l["restore_seconds"],
                                        "restore_bytes_read": read, "own_shard_bytes": own,
                                        "equal": l["digest"] == s["digest"],
                                        "restore_spool_peak_bytes": l["spool_peak_bytes"]})
                        x = runs[v][-1]
                        print(f"round {r} {v} rank {s['rank']}: blocked"
                              f" {[round(b, 3) for b in s['blocked_seconds']]}s, copy"
                              f" {s['copy_seconds']:.3f}s, upload {[round(u, 2) for u in s['upload_seconds']]}s,"
                              f" spool peak {s['spool_peak_bytes'] / MiB:.0f} MiB, restore"
                              f" {x['restore_seconds']:.2f}s reading {read / own:.2f}x its shard,"
                              f" equal {x['equal']}", flush=True)
                    for key in storage.list_keys(""):  # the server's disk is this machine's
                        storage.delete(key)
        finally:
            server.stop()
    for v in variants:
        rows = runs[v]
        steady = [b for x in rows for b in x["blocked_seconds"][1:]]
        first = [x["blocked_seconds"][0] for x in rows]
        copy = [x["copy_seconds"] for x in rows]
        ratio_read = [x["restore_bytes_read"] / x["own_shard_bytes"] for x in rows]
        results["variants"][v] = {
            "state_bytes_per_rank": statistics.median(x["state_bytes"] for x in rows),
            "blocked_seconds": summary(steady), "first_blocked_seconds": summary(first),
            "copy_seconds": summary(copy),
            "blocked_over_copy": round(statistics.median(steady) / statistics.median(copy), 2),
            "upload_seconds": summary([u for x in rows for u in x["upload_seconds"]]),
            "spool_peak_bytes": max(x["spool_peak_bytes"] for x in rows),
            "restore_spool_peak_bytes": max(x["restore_spool_peak_bytes"] for x in rows),
            "restore_seconds": summary([x["restore_seconds"] for x in rows]),
            "restore_read_over_own_shard": summary(ratio_read),
            "restored_equal": all(x["equal"] for x in rows),
            "step_seconds_idle": summary([x["step_seconds_idle"] for x in rows]),
            "step_seconds_during_upload": summary([x["step_seconds_during_upload"] for x in rows
                                                   if x["step_seconds_during_upload"] is not None])}
        idle = results["variants"][v]["step_seconds_idle"]["p50"]
        busy = results["variants"][v]["step_seconds_during_upload"]["p50"]
        results["variants"][v]["step_slowdown_during_upload"] = round(busy / idle, 3) if busy else None
    if "old" in variants and "new" in variants:
        o, n = results["variants"]["old"], results["variants"]["new"]
        results["new_over_old_blocked"] = round(n["blocked_seconds"]["p50"] / o["blocked_seconds"]["p50"], 3)
        results["new_over_old_restore"] = round(n["restore_seconds"]["p50"] / o["restore_seconds"]["p50"], 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    for v, row in results["variants"].items():
        print(f"{v}: blocked p50 {row['blocked_seconds']['p50']:.3f}s (first"
              f" {row['first_blocked_seconds']['p50']:.3f}s), {row['blocked_over_copy']}x the copy"
              f" ({row['copy_seconds']['p50']:.3f}s); spool peak {row['spool_peak_bytes']} B;"
              f" restore {row['restore_seconds']['p50']:.2f}s reading"
              f" {row['restore_read_over_own_shard']['p50']:.2f}x its shard; equal {row['restored_equal']};"
              f" step {row['step_seconds_idle']['p50']:.3f}s idle,"
              f" {row['step_slowdown_during_upload']}x while saving")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
