"""Restore benchmark: a single-pod checkpoint read back from S3, time and peak memory.

    python benchmarks/bench_restore.py --sizes 1024 --rounds 3 --out benchmarks/results/restore.json
    python benchmarks/bench_restore.py --sizes 1024 --cap-mbit 1600   # through a 1.6 Gbit/s link

Starts its own S3 server (versitygw via phoenix_lab.s3.S3Server) on loopback, saves one
checkpoint per size (``--shards`` tensor shards, the last one largest, plus trainer.json)
with this tree's writer, then restores it, rounds interleaved, with these variants - each in
a fresh child process so peak RSS never mixes:
  old       ``load_checkpoint`` of the code at ``--old-rev`` (default: the commit before the
            parallel reader, 0d877aa~1), run from a ``git archive`` of that revision's
            trainer_image on PYTHONPATH: one GET stream per shard, shards one after another,
            chunks joined, torch.load from BytesIO;
  main      the same for ``--main-rev`` (default ``main``): parallel ranged GETs, but every
            shard's sha256 in byte order on one thread at a time;
  new       ``load_checkpoint`` of this tree: parallel ranged GETs (PHOENIX_RESTORE_PART_MB x
            PHOENIX_RESTORE_CONCURRENCY, defaults 8 MiB x 8), each multipart shard checked by
            the store's composite SHA-256, every part hashed by the thread that read it,
            loaded from the download's own memory;
  baseline  a plain parallel downloader of the same width: boto3 ``download_fileobj`` with
            s3transfer's concurrency (same part size and threads) into a BytesIO per shard,
            no hashing, no loading.
``--cap-mbit R`` puts a TCP proxy in front of the server whose one token bucket caps the
bytes sent back to every client together at R Mbit/s: all variants read through it alike
(the save does not). ``--no-sha-ni`` runs every variant with OpenSSL's SHA instructions
masked off (``OPENSSL_ia32cap``; hashlib's sha256 is OpenSSL's): a CPU without them, where
sha256 runs at about a third of the speed (this machine: ~0.77 against ~2.1 GB/s on one
core), the kind of CPU the first measurement (0.72x) was taken on. Every run records the machine's load average (other engineers share
its cores) beside its figures.
Each child measures seconds (storage open and manifest read excluded) and peak extra RSS:
the peak RSS (VmHWM, reset through /proc/self/clear_refs after its imports and set-up, so
the imports' transient peak cannot hide it; ru_maxrss where that is not possible) after the
restore with every loaded tensor touched, minus the RSS at that reset; and the CPU seconds
(user + system) it spent over the timed part. Reports medians; goals (issue 28): new >= 0.9x the baseline's
throughput, peak extra RSS beyond the restored state itself <= 1.2x the largest shard.
Never run by the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MiB = 1 << 20
VARIANTS = ("old", "main", "new", "baseline")
OLD_REV = "0d877aa~1"  # main before issue 28's parallel reader


class CappedProxy:
    """A loopback TCP proxy to ``target`` (host, port) whose responses, over all connections
    together, go out at most ``rate`` bytes/s (one token bucket, ``burst`` bytes deep):
    a link of that speed for every variant alike. Requests go through uncapped."""

    CHUNK = 64 << 10

    def __init__(self, target: tuple[str, int], rate: float, burst: int = 256 << 10) -> None:
        import socket
        import threading

        self.target, self.rate, self.burst = target, rate, burst
        self.lock = threading.Lock()
        self.next_free = 0.0  # virtual time at which the bucket has room again
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.next_free = max(self.next_free, now - self.burst / self.rate) + n / self.rate
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)

    def _accept(self) -> None:
        import socket
        import threading

        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src, dst, capped: bool) -> None:
        import socket

        buf = bytearray(self.CHUNK)
        try:
            while n := src.recv_into(buf):
                if capped:
                    self._take(n)
                dst.sendall(memoryview(buf)[:n])
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset the peak RSS (Linux: clear_refs 5) so the imports' transient peak cannot hide
    the restore's; the RSS now, the baseline. Without clear_refs: ru_maxrss so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    try:
        return _status("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the child: one restore, measured ---------------------------------------------------------

def child(variant: str, uri: str, part_mb: int, concurrency: int) -> dict:
    import torch  # noqa: F401 - imported before the baseline RSS, like a trainer's

    from phoenix_trainer.checkpoint import load_checkpoint
    from phoenix_trainer.core.layout import latest_valid_checkpoint, step_dir_name
    from phoenix_trainer.core.storage import open_storage

    storage = open_storage(uri)
    info = latest_valid_checkpoint(storage, deep=False)
    assert info is not None and info.manifest is not None, f"no checkpoint under {uri}"
    base = _reset_peak_rss()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if variant == "baseline":
        import io

        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=part_mb * MiB, multipart_chunksize=part_mb * MiB,
                             max_concurrency=concurrency, use_threads=True)
        out = {}
        for name in sorted(info.manifest.files):
            buf = io.BytesIO()
            storage.client.download_fileobj(storage.bucket, storage._key(f"{step_dir_name(info.step)}/{name}"),
                                            buf, Config=cfg)
            out[name] = buf
        seconds = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        nbytes = sum(b.getbuffer().nbytes for b in out.values())
    else:
        out = load_checkpoint(storage, info)
        seconds = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        nbytes = sum(e.size for e in info.manifest.files.values())
        touched = 0.0
        for shard in out.values():  # the state is usable: every page of it in memory
            if isinstance(shard, dict):
                touched += float(sum(t.float().sum() for t in shard.values()
                                     if hasattr(t, "float")))
    peak = _peak_rss()
    # CPU this process spent on the restore, over the timed part (not the server's, the same
    # for every variant): a figure the machine's load blurs far less than seconds
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    # shards the restore could check by the store's composite (this tree's manifest field)
    composite = sum(1 for e in info.manifest.files.values() if getattr(e, "part_size", None))
    return {"variant": variant, "seconds": seconds, "bytes": nbytes, "peak_extra_rss": peak - base,
            "cpu_seconds": cpu,
            "composite_shards": composite if variant == "new" else 0}


# -- the parent --------------------------------------------------------------------------------

def save_checkpoint(storage, size_mb: int, shards: int) -> dict[str, int]:
    """One checkpoint of about ``size_mb``: ``shards`` float32 shards, the last twice the
    others (model + optimizer state), plus trainer.json. Returns shard -> bytes."""
    import torch

    from phoenix_trainer.checkpoint import AsyncCheckpointer, Snapshot

    weights = [1] * (shards - 1) + [2]
    tensors = {}
    for i, w in enumerate(weights):
        n = size_mb * MiB * w // sum(weights) // 4
        tensors[f"shard{i}.pt"] = {"w": torch.randn(n)}
    ck = AsyncCheckpointer(storage, phase="bench", config_fingerprint="bench")
    # The tensors themselves, not Snapshot.take's copy of them: one copy of the state in
    # this process, so a 10 GiB checkpoint needs 10 GiB here, not 20.
    snap = Snapshot(1, 0, tensors, {"trainer.json": {"step": 1}})
    snap.nbytes = sum(t["w"].numel() * 4 for t in tensors.values())
    del tensors
    ck.save(snap, blocking=True)
    del snap
    ck.close()
    assert ck.latest is not None and ck.latest.manifest is not None
    return {n: e.size for n, e in ck.latest.manifest.files.items()}


def run_child(variant: str, uri: str, env: dict, args, trees: dict[str, Path]) -> dict:
    path = [str(trees.get(variant, ROOT / "trainer_image")), str(ROOT / "lab")]
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--uri", uri,
         "--part-mb", str(args.part_mb), "--concurrency", str(args.concurrency)],
        env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(path),
             "PHOENIX_RESTORE_PART_MB": str(args.part_mb),
             "PHOENIX_RESTORE_CONCURRENCY": str(args.concurrency)},
        capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{variant} child failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load1"] = round(os.getloadavg()[0], 2)  # the machine's load as the run ended
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/restore.json")
    ap.add_argument("--sizes", default="1024", help="checkpoint sizes in MiB, comma-separated")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--part-mb", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--old-rev", default=OLD_REV)
    ap.add_argument("--main-rev", default="main")
    ap.add_argument("--no-sha-ni", action="store_true",
                    help="mask OpenSSL's SHA instructions in every variant's process")
    ap.add_argument("--cap-mbit", type=float, default=0,
                    help="cap the server's responses to all clients together at this rate")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.uri, args.part_mb, args.concurrency)))
        return 0

    sys.path[:0] = [str(ROOT / "trainer_image"), str(ROOT / "lab")]
    from benchgit import commit_of, old_tree
    from benchstats import summary
    from phoenix_lab.s3 import S3Server
    from phoenix_trainer.core.storage.s3 import S3Storage

    variants = args.variants.split(",")
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "config": {k: v for k, v in vars(args).items() if k not in ("child", "uri")},
                     "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp:
        tmpp = Path(tmp)
        trees = {}
        for v, rev in (("old", args.old_rev), ("main", args.main_rev)):
            if v in variants:
                (tmpp / v).mkdir()
                trees[v] = old_tree(rev, tmpp / v)
                results["config"][f"{v}_commit"] = commit_of(rev)
        server = S3Server(tmpp / "s3")
        ep = server.start()
        proxy = None
        try:
            server.ensure_bucket("bench")
            env = ep.env()
            if args.no_sha_ni:
                # CPUID leaf 7 EBX bit 29 (SHA) cleared in OpenSSL's view of the CPU
                env["OPENSSL_ia32cap"] = ":~0x20000000"
            if args.cap_mbit:
                from urllib.parse import urlparse

                u = urlparse(ep.url)
                proxy = CappedProxy((u.hostname, u.port), args.cap_mbit * 1e6 / 8)
                env["AWS_ENDPOINT_URL"] = f"{u.scheme}://127.0.0.1:{proxy.port}"
            for size_mb in [int(s) for s in args.sizes.split(",")]:
                prefix = f"size-{size_mb}"
                storage = S3Storage("bench", prefix, endpoint_url=ep.url, access_key=ep.access_key,
                                    secret_key=ep.secret_key, region=ep.region)
                shards = save_checkpoint(storage, size_mb, args.shards)
                uri = f"s3://bench/{prefix}"
                runs: dict[str, list[dict]] = {v: [] for v in variants}
                for r in range(args.rounds):
                    for v in variants:  # interleaved: drift on a shared machine hits all alike
                        runs[v].append(run_child(v, uri, env, args, trees))
                        print(f"size {size_mb} MiB round {r} {v}: {runs[v][-1]['seconds']:.2f}s"
                              f" peak +{runs[v][-1]['peak_extra_rss'] / MiB:.0f} MiB"
                              f" cpu {runs[v][-1]['cpu_seconds']:.2f}s"
                              f" load {runs[v][-1]['load1']}", flush=True)
                total, largest = sum(shards.values()), max(shards.values())
                row: dict = {"shards": shards, "bytes": total, "largest_shard": largest}
                for v in variants:
                    secs = [x["seconds"] for x in runs[v]]
                    rss = [x["peak_extra_rss"] for x in runs[v]]
                    med_s, med_rss = statistics.median(secs), statistics.median(rss)
                    cpu = [x["cpu_seconds"] for x in runs[v]]
                    row[v] = {"seconds": summary(secs), "peak_extra_rss": summary(rss),
                              "cpu_seconds": summary(cpu),
                              "cpu_seconds_per_gb": round(statistics.median(cpu) / (total / 1e9), 3),
                              "load1": [x["load1"] for x in runs[v]],
                              "mb_per_s": round(total / 1e6 / med_s, 1),
                              "peak_extra_rss_per_largest_shard": round(med_rss / largest, 2),
                              # beyond the bytes it hands back (state, or BytesIOs)
                              "overhead_rss_per_largest_shard": round((med_rss - total) / largest, 2)}
                if "new" in variants and "baseline" in variants:
                    row["new_over_baseline_throughput"] = round(
                        row["new"]["mb_per_s"] / row["baseline"]["mb_per_s"], 3)
                if "main" in variants and "baseline" in variants:
                    row["main_over_baseline_throughput"] = round(
                        row["main"]["mb_per_s"] / row["baseline"]["mb_per_s"], 3)
                if "new" in variants and "old" in variants:
                    row["new_over_old_throughput"] = round(
                        row["new"]["mb_per_s"] / row["old"]["mb_per_s"], 3)
                results["sizes"][str(size_mb)] = row
                storage.delete_prefix("step-0000000001")
        finally:
            if proxy is not None:
                proxy.stop()
            server.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    for size, row in results["sizes"].items():
        print(f"{size} MiB: " + ", ".join(
            f"{v} {row[v]['mb_per_s']} MB/s peak +{row[v]['peak_extra_rss_per_largest_shard']}x"
            f" largest shard" for v in variants if v in row)
            + f"; new/baseline {row.get('new_over_baseline_throughput')}"
            + f" (main/baseline {row.get('main_over_baseline_throughput')})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
