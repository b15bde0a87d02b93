"""Download the checkpoint a replacement pod resumes from while its script still imports
torch and builds the model.

The operator names that checkpoint when it creates the pod (``PHOENIX_RESUME_FROM``), so
nothing is left to decide: at interpreter start (the image's ``.pth`` file, right after
``preflight``) a daemon thread reads the checkpoint's manifest and downloads its shards into
memory, one after another, while the main thread imports torch, builds the model and
initialises CUDA. ``Session`` restores exactly as before - it verifies the checkpoint and
checks every shard's size and sha256 against the manifest - but takes each shard's bytes
from here instead of downloading them, waiting for a shard still in flight. Bytes are
handed over once and dropped; whatever was not taken is dropped when the restore ends.
Any trouble (no manifest, a network error, not enough memory) only means no prefetch: the
restore downloads as it would have, and says why in the log.

When (``PHOENIX_PREFETCH``): ``1`` always, ``0`` never; unset, only in the container's main
process (PID 1: the trainer; never its children or ``python -c``) running a script, never
for a standby (it preloads by itself), a gang (its shards are read by
torch.distributed.checkpoint, rank by rank) or a torchrun agent, only with at least
``MIN_CPUS`` CPUs to run on (a download is not free: receiving, copying and hashing take
CPU, which on two cores is taken from the imports it was meant to overlap - measured in
benchmarks/bench_first_start.py), and only for a checkpoint that fits in half the memory
left (the cgroup's limit and MemAvailable).

Standard library and the storage module only: never torch.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from .contract import ENV_RESUME_FROM, ENV_ROLE, ROLE_STANDBY

log = logging.getLogger("phoenix.prefetch")

ENV_PREFETCH = "PHOENIX_PREFETCH"  # "1": always, "0": never, unset: auto (module docstring)
MIN_CPUS = 4  # auto: fewer, and the download competes with the imports for the CPU

_current: "Prefetch | None" = None


class Prefetch:
    """Shards of one checkpoint (``uri``: its step directory), downloaded on a daemon thread."""

    def __init__(self, uri: str, *, memory_budget: int | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.memory_budget = memory_budget
        self.error: str | None = None
        self.nbytes = 0  # downloaded so far
        self.seconds = 0.0  # the download, once done
        self.waited = 0.0  # how long restore waited for shards still in flight
        self._cond = threading.Condition()
        self._shards: dict[str, tuple[bytes, str]] = {}  # name -> (bytes, their sha256)
        self._pending: set[str] | None = None  # still to come; None: manifest not read yet
        self._done = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="phoenix-prefetch", daemon=True)

    def start(self) -> "Prefetch":
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return self._done

    def _run(self) -> None:
        from .layout import MANIFEST_NAME, Manifest, split_checkpoint_uri, step_dir_name
        from .storage import open_storage

        t0 = time.perf_counter()
        try:
            prefix, step = split_checkpoint_uri(self.uri)
            if step is None:
                raise ValueError(f"{self.uri} names no step directory")
            storage = open_storage(prefix)
            d = step_dir_name(step)
            # Only the manifest, for the shard list: the restore verifies it all again.
            manifest = Manifest.from_json(storage.get_bytes(f"{d}/{MANIFEST_NAME}"))
            size = sum(f.size for f in manifest.files.values())
            if self.memory_budget is not None and size > self.memory_budget:
                raise MemoryError(f"{size / 1e6:.0f} MB would not fit in half the memory left"
                                  f" ({self.memory_budget * 2 / 1e6:.0f} MB)")
            names = sorted(manifest.files)
            with self._cond:
                self._pending = set(names)
            for name in names:
                if self._closed:
                    break
                got = storage.get_bytes_sha256(f"{d}/{name}")  # hashed here, off the restore's path
                with self._cond:
                    if not self._closed:
                        self._shards[name] = got
                        self.nbytes += len(got[0])
                    self._pending.discard(name)
                    self._cond.notify_all()
        except Exception as e:  # noqa: BLE001 - no prefetch; the restore downloads as before
            self.error = f"{type(e).__name__}: {e}"[:300]
        finally:
            with self._cond:
                self.seconds = time.perf_counter() - t0
                self._done = True
                self._pending = set()
                self._cond.notify_all()

    def take(self, uri: str, name: str) -> tuple[bytes, str] | None:
        """Shard ``name`` of checkpoint ``uri`` and its sha256 if this prefetch holds it
        (waiting while it is in flight), handed over once; None: download it yourself."""
        if uri.rstrip("/") != self.uri:
            return None
        t0 = time.perf_counter()
        with self._cond:
            while not self._done and (self._pending is None or name in self._pending):
                self._cond.wait()
            self.waited += time.perf_counter() - t0
            return self._shards.pop(name, None)

    def close(self) -> None:
        """Drop what was not taken; stop downloading more."""
        with self._cond:
            self._closed = True
            self._shards.clear()

    def summary(self) -> dict[str, float | str]:
        out: dict[str, float | str] = {"bytes": self.nbytes,
                                       "seconds": round(self.seconds, 3),
                                       "waited": round(self.waited, 3)}
        if self.error:
            out["error"] = self.error
        return out


def wanted(environ: Mapping[str, str], argv: Sequence[str], pid: int,
           cpus: float | None = None) -> str | None:
    """The checkpoint to prefetch in this process, or None (module docstring: when).
    ``cpus``: how many this process may use (default: ``usable_cpus()``)."""
    uri = environ.get(ENV_RESUME_FROM)
    switch = environ.get(ENV_PREFETCH, "").strip().lower()
    if not uri or switch in ("0", "false", "no", "off"):
        return None
    if switch in ("1", "true", "yes", "on"):
        return uri
    gang = any(_int(environ.get(k)) > 1 for k in ("PET_NNODES", "WORLD_SIZE", "PET_NPROC_PER_NODE"))
    script = bool(argv) and argv[0].endswith(".py")
    if pid != 1 or not script or gang or environ.get(ENV_ROLE) == ROLE_STANDBY:
        return None
    return uri if (usable_cpus() if cpus is None else cpus) >= MIN_CPUS else None


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> float:
    """CPUs this process may run on: its affinity, capped by the cgroup's (v2) CPU quota."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cpus


def memory_budget(cgroup: Path = Path("/sys/fs/cgroup"), meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Half the memory this container has left: the least of MemAvailable and the cgroup
    (v2) limit minus its usage; None if neither can be read."""
    left: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                left.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, min(left)) // 2 if left else None


def start_from_env(environ: Mapping[str, str] = os.environ, argv: Sequence[str] | None = None,
                   pid: int | None = None) -> Prefetch | None:
    """Start prefetching if this process should (``wanted``); the prefetch, or None."""
    global _current
    import sys

    uri = wanted(environ, sys.argv if argv is None else argv, os.getpid() if pid is None else pid)
    if uri is None:
        return None
    try:
        # Imported here, on the main thread: the download thread then imports nothing while
        # the script imports torch beside it.
        for module in (f"{__package__}.layout", f"{__package__}.storage",
                       *(("boto3",) if uri.startswith("s3://") else ())):
            importlib.import_module(module)

        _current = Prefetch(uri, memory_budget=memory_budget()).start()
    except Exception as e:  # noqa: BLE001 - from a .pth file: never stop the interpreter
        log.warning("cannot prefetch %s: %s: %s", uri, type(e).__name__, e)
        return None
    return _current


def current() -> Prefetch | None:
    """The prefetch this process started, until ``release``."""
    return _current


def release() -> Prefetch | None:
    """Stop and forget the prefetch (after the restore); it, for its summary."""
    global _current
    pre, _current = _current, None
    if pre is not None:
        pre.close()
    return pre


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0
