"""What the operator's deep verification of one checkpoint costs, by checkpoint size: the
stored S3 checksums (one HEAD per shard) vs reading every shard and hashing it (what it did
before, ~ one whole download per verified checkpoint).

    python benchmarks/bench_verify.py --sizes-mb 1024 --shards 4 --out benchmarks/results/verify.json

Starts its own S3 server (versitygw via phoenix_lab.s3.S3Server) in a temp dir, commits one
checkpoint of the given size (split into --shards shards) with the trainer's writer, then
times ``layout.verify_checkpoint(deep=True)`` both ways, interleaved, and reports medians and
the bytes downloaded. Never run by the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from phoenix_lab.s3 import S3Server
from phoenix_trainer.core.layout import verify_checkpoint
from phoenix_trainer.core.storage.s3 import S3Storage
from phoenix_trainer.core.writer import commit_checkpoint

MB = 1 << 20


class Downloading:
    """The same storage as if the store kept no checksums: verification reads every shard."""

    def __init__(self, inner: S3Storage) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stat(self, key):
        return self.inner.stat(key)[0], None


def measure(storage: S3Storage, size_mb: int, shards: int, reps: int, spool: Path) -> dict:
    files = {}
    for i in range(shards):
        path = spool / f"shard-{i}.pt"
        with open(path, "wb") as f:
            for _ in range(size_mb // shards):
                f.write(os.urandom(MB))
        files[f"shard-{i}.pt"] = path
    t0 = time.perf_counter()
    commit_checkpoint(storage, 1, files, epoch=0, phase="train", config_fingerprint="bench")
    commit_seconds = time.perf_counter() - t0
    for path in files.values():
        path.unlink()
    received = {"n": 0}
    storage.client.meta.events.register(
        "after-call.s3.GetObject",
        lambda http_response, **kw: received.__setitem__(
            "n", received["n"] + int(http_response.headers.get("content-length", 0))))
    times: dict[str, list[float]] = {"checksums": [], "download": []}
    downloaded: dict[str, int] = {}
    for _ in range(reps):
        for how, st in (("checksums", storage), ("download", Downloading(storage))):
            received["n"] = 0
            t0 = time.perf_counter()
            info = verify_checkpoint(st, 1, deep=True)
            times[how].append(time.perf_counter() - t0)
            assert info.valid, info.reason
            downloaded[how] = received["n"]
    return {"size_mb": size_mb, "shards": shards, "commit_seconds": round(commit_seconds, 2),
            **{f"{how}_seconds_median": round(statistics.median(t), 3) for how, t in times.items()},
            **{f"{how}_bytes_downloaded": n for how, n in downloaded.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/verify.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server(Path(tmp) / "s3")
        ep = server.start()
        try:
            ep.client().create_bucket(Bucket="bench-verify")
            results = []
            for size in args.sizes_mb:
                storage = S3Storage("bench-verify", f"size-{size}/train", endpoint_url=ep.url,
                                    access_key=ep.access_key, secret_key=ep.secret_key)
                spool = Path(tmp) / f"spool-{size}"
                spool.mkdir()
                results.append(measure(storage, size, args.shards, args.reps, spool))
                print(json.dumps(results[-1]), flush=True)
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "verify", "host": platform.node(),
                                    "cpus": os.cpu_count(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
