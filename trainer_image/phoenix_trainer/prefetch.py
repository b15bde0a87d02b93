"""Download the checkpoint a replacement pod resumes from while its script still imports
torch and builds the model.

The operator names that checkpoint when it creates the pod (``PHOENIX_RESUME_FROM``), so
nothing is left to decide: at interpreter start (the image's ``.pth`` file, right after
``preflight``) the trainer starts a child process that reads the checkpoint's manifest and
downloads its shards with the restore's parallel ranged reader (``core.storage.parallel``)
into files in the spool directory, hashing each as it arrives, while the trainer imports torch, builds the model and initialises CUDA. A child
process, not a thread: a thread's download needs the GIL back after every ``recv``, and
while the main thread imports, each handoff waits out the interpreter's switch interval -
measured, a thread fetched 0.8 GB at a third of the link's speed and slowed the imports
(benchmarks/bench_first_start.py). ``Session`` restores exactly as before - it verifies the
checkpoint, checks every shard's size and digest against the manifest - but takes each
shard (and the digest the child computed of those very bytes: ``FileEntry.restore_check``)
from here instead of
downloading it, waiting for a shard still in flight. Files are read once and deleted; the
rest (and the child) go when the restore ends. Any trouble (no manifest, a network error,
no room) only means no prefetch: the restore downloads as it would have, and says why.

When (``PHOENIX_PREFETCH``): ``1`` always, ``0`` never; unset, only in the container's main
process (PID 1: the trainer; never its children or ``python -c``) running a script, never
for a standby (it preloads by itself), a gang (its shards are read by
torch.distributed.checkpoint, rank by rank) or a torchrun agent, only with at least
``MIN_CPUS`` CPUs to run on (the child's download takes CPU too - receiving, hashing,
writing - and with one CPU that would come out of the imports it is meant to overlap; with
two it won, capped or not: benchmarks/README.md), and only for a checkpoint that fits in
half the spool's free space.

Standard library only on the trainer's side (the child imports the storage module): this
runs before the script's first import.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

from .core.contract import ENV_RESUME_FROM, ENV_ROLE, ENV_SPOOL_DIR, ROLE_STANDBY

ENV_PREFETCH = "PHOENIX_PREFETCH"  # "1": always, "0": never, unset: auto (module docstring)
MIN_CPUS = 2  # auto: fewer, and the download would compete with the imports for the CPU

_current: "Prefetch | None" = None


class Prefetch:
    """Shards of one checkpoint (``uri``: its step directory), downloaded into ``folder`` by
    a child process that reports each finished shard as a JSON line on its stdout."""

    def __init__(self, uri: str, folder: Path) -> None:
        self.uri = uri.rstrip("/")
        self.folder = folder
        self.error: str | None = None
        self.nbytes = 0  # handed over
        self.seconds: float | None = None  # the child's download, up to its last shard
        self.waited = 0.0  # how long restore waited for shards still in flight
        self._ready: dict[str, str] = {}  # shard -> digest (FileEntry.restore_check), finished and not yet taken
        self._done = False  # nothing more to read
        self._finished = False  # the child said it fetched every shard
        self._proc: Any = None  # the child (subprocess.Popen)

    def start(self) -> "Prefetch":
        import subprocess  # here: the .pth file imports this module in every interpreter

        self.folder.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, self.uri, str(self.folder)],
            env={**os.environ, ENV_PREFETCH: "0"},  # the child never prefetches for itself
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        return self

    def _read_line(self) -> bool:
        """One report from the child; False once it has no more to say."""
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._done = True
            if self.error is None and not self._finished:
                self.error = f"the prefetch process ended (exit {self._proc.wait()})"
            return False
        report = json.loads(line)
        if "shard" in report:
            self._ready[report["shard"]] = report["digest"]
            self.seconds = report["seconds"]  # since the child started, at this shard
        elif "error" in report:
            self.error = report["error"]
        elif report.get("done"):
            self._finished = True
        return True

    def take(self, uri: str, name: str) -> tuple[bytes, str] | None:
        """Shard ``name`` of checkpoint ``uri`` and its digest if the child fetched it
        (waiting while it is in flight), handed over once; None: download it yourself."""
        if uri.rstrip("/") != self.uri or self._proc is None:
            return None
        t0 = time.perf_counter()
        while name not in self._ready and not self._done and self._read_line():
            pass
        self.waited += time.perf_counter() - t0
        digest = self._ready.pop(name, None)
        if digest is None:
            return None
        path = self.folder / name
        try:
            data = path.read_bytes()
            path.unlink()
        except OSError:
            return None
        self.nbytes += len(data)
        return data, digest

    def close(self) -> None:
        """Stop the child if it still runs; delete what was not taken."""
        import shutil

        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        elif self._proc is not None:  # it finished: its last words (the seconds) are there
            while not self._done and self._read_line():
                pass
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes": self.nbytes, "waited": round(self.waited, 3)}
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 3)
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


def start_from_env(environ: Mapping[str, str] = os.environ, argv: Sequence[str] | None = None,
                   pid: int | None = None) -> Prefetch | None:
    """Start prefetching if this process should (``wanted``); the prefetch, or None.

    Once per process: Python 3.11's ``site`` runs a venv's ``.pth`` files twice at start-up
    (from ``venv()`` and again from ``main()``; the image's venv and this repository's both
    do), and two children writing the same folder broke each other's files. The trainer's own children never
    prefetch (a forced ``PHOENIX_PREFETCH=1`` is not inherited)."""
    global _current
    if _current is not None:
        return _current
    uri = wanted(environ, sys.argv if argv is None else argv, os.getpid() if pid is None else pid)
    if uri is None:
        return None
    if environ is os.environ:
        os.environ[ENV_PREFETCH] = "0"
    spool = Path(environ.get(ENV_SPOOL_DIR) or tempfile.gettempdir())
    try:
        _current = Prefetch(uri, spool / f"prefetch-{os.getpid()}").start()
    except Exception as e:  # noqa: BLE001 - from a .pth file: never stop the interpreter
        print(f"phoenix-trainer: cannot prefetch {uri}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return _current


def current() -> Prefetch | None:
    """The prefetch this process started, until ``release``."""
    return _current


def adopt() -> Prefetch | None:
    """Hand the prefetch this process started to its owner (a session's restore, which closes
    it), forgetting it here; None if there is none."""
    global _current
    pre, _current = _current, None
    return pre


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


def _download(uri: str, folder: Path, out: IO[str]) -> None:
    """The child: every shard of ``uri`` into ``folder`` (``<name>.part``, renamed when
    complete), one JSON line per finished shard on ``out`` (its digest, the seconds since the
    child started), then ``done`` - or an ``error``."""
    import mmap
    import shutil

    from .core.layout import MANIFEST_NAME, Manifest, split_checkpoint_uri, step_dir_name
    from .core.storage import ReadConfig, open_storage, read_parallel

    t0 = time.perf_counter()

    def report(**fields: Any) -> None:
        out.write(json.dumps(fields) + "\n")
        out.flush()

    try:
        prefix, step = split_checkpoint_uri(uri)
        if step is None:
            raise ValueError(f"{uri} names no step directory")
        storage = open_storage(prefix)
        d = step_dir_name(step)
        # Only the manifest, for the shard list: the restore verifies it all again.
        manifest = Manifest.from_json(storage.get_bytes(f"{d}/{MANIFEST_NAME}"))
        size = sum(f.size for f in manifest.files.values())
        room = shutil.disk_usage(folder).free // 2
        if size > room:
            raise OSError(f"{size / 1e6:.0f} MB would not fit in half the spool's free space"
                          f" ({room * 2 / 1e6:.0f} MB free in {folder})")
        names = sorted(manifest.files)
        keys = [(f"{d}/{name}", manifest.files[name].size, manifest.files[name].restore_check()[0])
                for name in names]
        maps: dict[str, Any] = {}

        def alloc(key: str, size: int) -> Any:
            # The shard's file, at its final size, mapped: ranges land in place, no copy.
            with open(folder / f"{key.rsplit('/', 1)[1]}.part", "w+b") as f:
                f.truncate(size)
                maps[key] = mmap.mmap(f.fileno(), size) if size else bytearray()
            return maps[key]

        # The same parallel ranged reader as the restore; ReadConfig.from_env's memory bound
        # here bounds the page cache dirtied ahead, the files themselves are the spool's.
        for got in read_parallel(storage, keys, alloc, ReadConfig.from_env()):
            name = got.key.rsplit("/", 1)[1]
            m = maps.pop(got.key)
            if isinstance(m, mmap.mmap):
                m.close()
            (folder / f"{name}.part").rename(folder / name)
            report(shard=name, digest=got.digest, seconds=time.perf_counter() - t0)
        report(done=True)
    except Exception as e:  # noqa: BLE001 - reported; the restore downloads by itself
        report(error=f"{type(e).__name__}: {e}"[:300])


if __name__ == "__main__":
    _download(sys.argv[1], Path(sys.argv[2]), sys.stdout)
