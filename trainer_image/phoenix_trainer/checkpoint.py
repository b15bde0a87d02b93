"""Asynchronous checkpointing: snapshot to CPU on the training thread, upload in background.

The training loop only waits for the CPU copy (``to_cpu``) and, if more than
``max_in_flight`` saves are still uploading, for the oldest one to finish. Serialization,
sha256, multipart upload, the manifest (written last) and retention run on one background
thread. Shards are serialized straight into storage (``writer.StreamedShard``): nothing is
staged on local disk, so a checkpoint bigger than the pod's ephemeral storage cannot get the
pod evicted; a gang's sharded state streams the same way (dcp_storage.py). Only files a
caller already wrote (``Snapshot.files``) use the local spool, and ``check_spool_room``
refuses those before writing when they would not fit. A save that fails after its retries is logged and dropped: the previous checkpoint
stays the latest valid one, so nothing half-written ever looks valid.

Must never be called from a signal handler, and never log credentials.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import mmap
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from .core.contract import (
    ENV_EPHEMERAL_STORAGE_MB, ENV_SPOOL_DIR, ENV_SPOOL_LIMIT_MB, checkpoint_nice,
    lower_thread_priority,
)
from .core.errors import (
    CheckpointError, CorruptCheckpointError, ObjectMismatchError, SpoolFullError,
)
from .core.layout import CheckpointInfo, step_dir_name
from .core.storage import FileEntry, ReadConfig, Storage, read_parallel
from .core.writer import RetryPolicy, Source, StreamedShard, apply_retention, commit_checkpoint
from .tensors import CopyInFlight, to_cpu_overlapped, tree_nbytes

log = logging.getLogger("phoenix.checkpoint")

# Conservative guesses used before this process has measured a save of its own.
_DEFAULT_BYTES_PER_SECOND = 50e6
_DEFAULT_FIXED_SECONDS = 2.0
# The document every checkpoint carries about the run (step, epoch, run id, progress, ...).
TRAINER_DOC = "trainer.json"


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors for torch.save, JSON documents) by shard name."""
    tensors = {k: v for k, v in state.items() if not k.endswith(".json")}
    docs = {k: v for k, v in state.items() if k.endswith(".json")}
    return tensors, docs


@dataclass
class Snapshot:
    """A CPU copy of everything a checkpoint holds; immutable once taken."""

    step: int
    epoch: int
    tensors: dict[str, Any]  # shard name -> object for torch.save
    documents: dict[str, Any]  # shard name -> JSON-able dict
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the manifest's "extra"
    files: dict[str, str] = field(default_factory=dict)  # shard name -> a file already written
    # A gang's sharded state staged for DCP (dcp_storage.Staged): the commit writes it.
    sharded: Any = None
    nbytes: int = 0
    seconds: float = 0.0  # how long the loop was blocked taking it (and settling it)
    in_flight: CopyInFlight | None = None  # deferred copies (take(defer=...)) not yet settled

    @classmethod
    def take(cls, step: int, epoch: int, tensors: dict[str, Any], documents: dict[str, Any],
             extra: dict[str, Any] | None = None, threads: int | None = None,
             defer: Callable[[Any], bool] | None = None) -> "Snapshot":
        """Copy ``tensors`` (every shard at once, by ``threads`` threads: ``to_cpu``) and
        ``documents``; the tensors ``defer`` picks may finish copying after this returns
        (``to_cpu_overlapped``): ``settle`` before they are written or this is saved."""
        t0 = time.perf_counter()
        copied, in_flight = to_cpu_overlapped(tensors, threads, defer)
        docs = json.loads(json.dumps(documents))  # deep copy + proves it serializes
        snap = cls(step, epoch, copied, docs, json.loads(json.dumps(extra or {})))
        snap.nbytes = tree_nbytes(copied)
        snap.in_flight = in_flight
        snap.seconds = time.perf_counter() - t0
        return snap

    def settle(self) -> bool:
        """Wait for the deferred copies; False if a deferred source was written while they
        ran (this is then not the state of its step, and is never saved)."""
        if self.in_flight is None:
            return True
        if self.in_flight.settled is None:
            t0 = time.perf_counter()
            self.in_flight.settle()
            self.seconds += time.perf_counter() - t0
        return bool(self.in_flight.settled)


@dataclass
class SaveStats:
    saves: int = 0
    failures: int = 0
    bytes: int = 0
    snapshot_seconds: list[float] = field(default_factory=list)
    # Staging before the first byte goes out: ~0 now that shards stream (serialization
    # overlaps the upload and is counted in upload_seconds).
    serialize_seconds: list[float] = field(default_factory=list)
    upload_seconds: list[float] = field(default_factory=list)
    total_seconds: list[float] = field(default_factory=list)  # serialize + upload + manifest
    wait_seconds: float = 0.0  # loop blocked because too many saves were in flight
    upload_bytes_per_second: list[float] = field(default_factory=list)


def _hashing_save(obj: Any, path: str) -> FileEntry:
    """torch.save to ``path`` while computing size and sha256 on the way out."""

    class _Tee(io.RawIOBase):
        def __init__(self, f):
            self.f, self.h, self.n = f, hashlib.sha256(), 0

        def writable(self):
            return True

        def write(self, b):
            self.h.update(b)
            self.n += len(b)
            return self.f.write(b)

    with open(path, "wb") as f:
        tee = _Tee(f)
        buf = io.BufferedWriter(tee, buffer_size=8 << 20)
        torch.save(obj, buf)
        buf.flush()
    return FileEntry(size=tee.n, sha256=tee.h.hexdigest())


class _Sink:
    """A write-only stream that remembers its sink's error: torch.save's zip writer replaces
    a failed write's exception with its own ("unexpected pos"), which would hide the
    ``StorageError`` a retry is for."""

    def __init__(self, f: Any) -> None:
        self.f, self.failed = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except BaseException as e:
            self.failed = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save_to(obj: Any, f: Any) -> None:
    sink = _Sink(f)
    try:
        torch.save(obj, sink)
    except BaseException:
        if sink.failed is not None:
            raise sink.failed from None
        raise


# The spool's share of the container's ephemeral-storage limit when no limit is set: the
# rest is for the container's logs and whatever else the script writes under /tmp.
SPOOL_SHARE_OF_EPHEMERAL = 0.8


def spool_limit_bytes(environ: Any = None) -> int | None:
    """``PHOENIX_SPOOL_LIMIT_MB`` in bytes; unset, ``SPOOL_SHARE_OF_EPHEMERAL`` of the
    container's ephemeral-storage limit (``PHOENIX_EPHEMERAL_STORAGE_MB``, which the operator
    sets where the container declares one: the kubelet evicts a pod over it, which would
    look like a preemption and repeat); else None (then free space is the limit)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_SPOOL_LIMIT_MB, "").strip()
    name = ENV_SPOOL_LIMIT_MB
    share = 1.0
    if not raw:
        raw, name = env.get(ENV_EPHEMERAL_STORAGE_MB, "").strip(), ENV_EPHEMERAL_STORAGE_MB
        share = SPOOL_SHARE_OF_EPHEMERAL
    if not raw:
        return None
    try:
        mb = float(raw)
    except ValueError:
        raise CheckpointError(f"{name}={raw!r} is not a number of MB") from None
    if mb < 0:
        raise CheckpointError(f"{name}={raw!r} must be >= 0")
    return int(mb * 1e6 * share)


def spool_usage(spool: str) -> int:
    total = 0
    for root, _, names in os.walk(spool):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, n)).st_size
    return total


def check_spool_room(spool: str, nbytes: int, what: str, *, limit: int | None = None,
                     free: int | None = None) -> None:
    """Refuse (``SpoolFullError``) to stage ``nbytes`` more under ``spool`` when that would
    pass ``PHOENIX_SPOOL_LIMIT_MB`` (or ``limit``) counting what is already there, or the
    file system's free space: better a failed checkpoint with a reason than a pod evicted for
    its ephemeral storage, which would look like a preemption and repeat."""
    limit = spool_limit_bytes() if limit is None else limit
    used = spool_usage(spool)
    if limit is not None and used + nbytes > limit:
        raise SpoolFullError(
            f"{what} needs ~{nbytes / 1e6:.1f} MB of local spool under {spool}"
            f" ({used / 1e6:.1f} MB already in use), over {ENV_SPOOL_LIMIT_MB}={limit / 1e6:g};"
            f" raise {ENV_SPOOL_LIMIT_MB} (default: {SPOOL_SHARE_OF_EPHEMERAL:.0%} of the"
            " container's ephemeral-storage limit) together with that limit (or the emptyDir's"
            " sizeLimit), or use fewer, larger ranks")
    if free is None:
        free = shutil.disk_usage(spool).free
    if nbytes > free:
        raise SpoolFullError(
            f"{what} needs ~{nbytes / 1e6:.1f} MB of local spool under {spool}, only"
            f" {free / 1e6:.1f} MB are free there; point {ENV_SPOOL_DIR} at a bigger volume")


def make_spool(spool_dir: str | None = None) -> str:
    """A fresh directory for this process's checkpoint files before upload.

    Under ``spool_dir``, else $PHOENIX_SPOOL_DIR, else the system temp dir. The directory is
    created if missing: the image's /tmp/phoenix-spool is hidden by the emptyDir mounted at
    /tmp (the root filesystem is read-only), so it must be made at run time.
    """
    root = spool_dir or os.environ.get(ENV_SPOOL_DIR) or None
    source = "spool_dir" if spool_dir else ENV_SPOOL_DIR
    try:
        if root is not None:
            os.makedirs(root, exist_ok=True)
        return tempfile.mkdtemp(prefix="phoenix-ckpt-", dir=root)
    except OSError as e:
        where = f"{source}={root!r}" if root is not None else f"the temp dir {tempfile.gettempdir()!r}"
        raise CheckpointError(
            f"cannot create the checkpoint spool under {where}: {e.strerror or e}. Point "
            f"{ENV_SPOOL_DIR} at a writable directory, e.g. under an emptyDir mounted at /tmp "
            "(the container's root filesystem is read-only)") from e


class AsyncCheckpointer:
    """Writes snapshots to a Storage in the background, bounded and retried."""

    def __init__(self, storage: Storage, *, phase: str, config_fingerprint: str, keep: int = 3,
                 run_id: str = "", attempt: int | None = None, max_in_flight: int = 1,
                 retry: RetryPolicy | None = None, spool_dir: str | None = None,
                 protect: Iterable[int] = (),
                 commit: Callable[..., CheckpointInfo] | None = None, retention: bool = True,
                 uid: str = "") -> None:
        if keep < 2:
            raise CheckpointError(f"keep={keep}: keep at least 2 checkpoints so there is a fallback")
        self.storage = storage
        self.phase = phase
        self.config_fingerprint = config_fingerprint
        self.keep = keep
        self.run_id = run_id
        self.attempt = attempt
        self.uid = uid  # the job's: another job's fence supersedes this writer
        self.max_in_flight = max(1, max_in_flight)
        self.retry = retry or RetryPolicy()
        self.protect = set(protect)
        # How files become a checkpoint: commit_checkpoint's signature; a gang plugs in its own
        # (every rank uploads, one publishes the manifest), and only that one applies retention.
        self.commit = commit or commit_checkpoint
        self.retention = retention
        self.spool = make_spool(spool_dir)
        self.stats = SaveStats()
        self.latest: CheckpointInfo | None = None  # newest checkpoint committed by this process
        # Steps this checkpointer committed and has not deleted: valid by construction, so
        # retention does not read them back (apply_retention's known_valid).
        self._committed: set[int] = set()
        self.last_error: BaseException | None = None
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._lock = threading.Lock()
        self._in_flight: list[Future] = []
        self._pending_steps: set[int] = set()
        # The upload runs below the loop's priority (lower_thread_priority): it may take the
        # cores the training leaves, not the training's own. A save the loop waits for (the
        # final one, the one on SIGTERM) runs at the loop's own priority instead: nothing
        # gives way to it, and an unprivileged thread cannot take back a nice level.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phoenix-ckpt",
                                            initializer=lower_thread_priority,
                                            initargs=(checkpoint_nice(),))
        self._urgent: ThreadPoolExecutor | None = None  # made on first use, by the loop's thread
        self.after_commit: list[Callable[[CheckpointInfo], None]] = []

    # -- training-thread API --------------------------------------------------------------
    def save(self, snapshot: Snapshot, *, blocking: bool = False) -> Future:
        """Queue ``snapshot`` for upload. Waits only if ``max_in_flight`` saves are pending."""
        if not snapshot.settle():  # the trainer settles first; anyone else is refused here
            raise CheckpointError(f"the snapshot of step {snapshot.step} was written to while it"
                                  " was being copied; it is not that step's state")
        # Here, on the loop's thread, which forks its DataLoader workers: never on the upload
        # thread (core/storage/upload_proc.py says why). A no-op once it runs.
        self.storage.prepare_uploads()
        t0 = time.perf_counter()
        self._slots.acquire()
        waited = time.perf_counter() - t0
        self.stats.wait_seconds += waited
        if waited > 0.01:
            log.info("checkpoint step %d waited %.2fs for an earlier upload (max_in_flight=%d)",
                     snapshot.step, waited, self.max_in_flight)
        self.stats.snapshot_seconds.append(snapshot.seconds)
        with self._lock:
            self._pending_steps.add(snapshot.step)
        executor = self._executor
        if blocking:
            # After every earlier save, so saves still commit one at a time and in order.
            self.wait()
            if self._urgent is None:
                self._urgent = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phoenix-ckpt-now")
            executor = self._urgent
        fut = executor.submit(self._write, snapshot)
        with self._lock:
            self._in_flight.append(fut)
        fut.add_done_callback(self._done)
        if blocking:
            fut.result()
        return fut

    def submit_aux(self, fn: Callable[[], Any]) -> Future:
        """Run small housekeeping (metrics upload) on the upload thread, off the step path."""
        return self._executor.submit(fn)

    def pending_steps(self) -> set[int]:
        with self._lock:
            return set(self._pending_steps)

    def in_flight(self) -> int:
        with self._lock:
            return sum(1 for f in self._in_flight if not f.done())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every queued save; True if all finished in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = [f for f in self._in_flight if not f.done()]
            if not pending:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            try:
                pending[0].exception(timeout=left)
            except TimeoutError:
                return False
            except Exception:  # noqa: BLE001 - the error was already logged by the worker
                pass

    def estimate_save_seconds(self, nbytes: int) -> float:
        """Expected wall time of a blocking save of ``nbytes``, from this process's history."""
        if self.stats.total_seconds and self.stats.bytes:
            per_save = self.stats.bytes / max(1, self.stats.saves)
            worst = max(self.stats.total_seconds[-5:])
            snap = max(self.stats.snapshot_seconds[-5:] or [0.0])
            return snap + worst * max(1.0, nbytes / max(1.0, per_save))
        return _DEFAULT_FIXED_SECONDS + nbytes / _DEFAULT_BYTES_PER_SECOND

    def close(self, timeout: float | None = None) -> None:
        self.wait(timeout)
        for executor in (self._executor, self._urgent):
            if executor is not None:
                executor.shutdown(wait=timeout is None, cancel_futures=True)
        shutil.rmtree(self.spool, ignore_errors=True)

    # -- upload thread --------------------------------------------------------------------
    def _done(self, fut: Future) -> None:
        self._slots.release()
        with self._lock:
            if fut in self._in_flight:
                self._in_flight.remove(fut)

    def _write(self, snap: Snapshot) -> CheckpointInfo:
        t0 = time.perf_counter()
        try:
            files: dict[str, Source] = {}
            for name, obj in snap.tensors.items():
                files[name] = StreamedShard(lambda f, obj=obj: _torch_save_to(obj, f),
                                            size_hint=tree_nbytes(obj))
            for name, doc in snap.documents.items():
                body = json.dumps(doc, sort_keys=True, indent=1).encode()
                files[name] = StreamedShard(lambda f, body=body: f.write(body), len(body))
            files.update(snap.files)
            t1 = time.perf_counter()
            more = {} if snap.sharded is None else {"sharded": snap.sharded}
            info = self.commit(
                self.storage, snap.step, files, epoch=snap.epoch, phase=self.phase,
                config_fingerprint=self.config_fingerprint, run_id=self.run_id,
                attempt=self.attempt, retry=self.retry, extra=snap.extra, uid=self.uid, **more)
            t2 = time.perf_counter()
            assert info.manifest is not None
            size = sum(info.manifest.files[n].size for n in files)
            if snap.sharded is not None:
                size += sum(e.size for e in snap.sharded.written.values())
            self.stats.saves += 1
            self.stats.bytes += size
            self.stats.serialize_seconds.append(t1 - t0)
            self.stats.upload_seconds.append(t2 - t1)
            self.stats.total_seconds.append(t2 - t0)
            self.stats.upload_bytes_per_second.append(size / max(1e-9, t2 - t1))
            log.info("saved checkpoint %s: %.1f MB, snapshot %.3fs (blocking), serialize +"
                     " upload %.2fs (%.0f MB/s)", info.uri, size / 1e6, snap.seconds,
                     t2 - t1, size / 1e6 / max(1e-9, t2 - t1))
            if self.latest is None or info.step >= self.latest.step:
                self.latest = info
            for cb in self.after_commit:
                try:
                    cb(info)
                except Exception:  # noqa: BLE001 - housekeeping must not fail a good save
                    log.exception("after-checkpoint hook failed for %s", info.uri)
            try:
                if self.retention:
                    self._committed.add(info.step)
                    deleted = apply_retention(self.storage, self.keep,
                                              protect=self.protect | {info.step},
                                              attempt=self.attempt, uid=self.uid,
                                              known_valid=self._committed)
                    self._committed.difference_update(deleted)
            except Exception as e:  # noqa: BLE001 - retention is best effort; retried next save
                log.warning("retention under %s failed (%s); will retry after the next save",
                            self.storage.uri, e)
            return info
        except BaseException as e:
            self.stats.failures += 1
            self.last_error = e
            log.error("checkpoint step %d to %s failed after retries: %s; the previous"
                      " checkpoint remains the latest valid one", snap.step, self.storage.uri, e)
            raise
        finally:
            with self._lock:
                self._pending_steps.discard(snap.step)
            shutil.rmtree(os.path.join(self.spool, step_dir_name(snap.step)), ignore_errors=True)


class ViewReader(io.RawIOBase):
    """A read-only, seekable file over a memoryview: torch.load reads it without the copy a
    ``BytesIO(buffer)`` would make."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self.view, self.pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.view)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        out = bytes(self.view[self.pos:end])
        self.pos = max(self.pos, end)
        return out

    def readinto(self, b: Any) -> int:  # torch.load's reader uses this: one copy, no bytes
        dst = memoryview(b).cast("B")
        n = max(0, min(len(dst), len(self.view) - self.pos))
        dst[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n


class ShardBuffer:
    """Where one shard is downloaded, sized to the manifest's size, and loaded from.

    On Linux a tensor shard goes into an anonymous memory file (memfd), mapped here for the
    download; ``torch.load(mmap=True)`` then maps that same file, so the loaded tensors are
    the downloaded pages: one copy of the shard in memory, not two (the bytes, then the
    tensors made from them). Elsewhere, and for small or JSON shards, a bytearray read
    through a view (``ViewReader``), still without joining chunks."""

    MIN_MAPPED = 1 << 20  # smaller shards: a bytearray; a file per shard is not worth it

    def __init__(self, size: int, mapped: bool = True) -> None:
        self.size, self.fd = size, None
        self.memory: Any = None
        if mapped and size >= self.MIN_MAPPED and hasattr(os, "memfd_create"):
            try:
                fd = os.memfd_create("phoenix-shard", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(fd, size)
                    self.memory = mmap.mmap(fd, size)
                except BaseException:
                    os.close(fd)
                    raise
                self.fd = fd
            except OSError as e:  # no memfd here (old kernel, seccomp): the plain way
                log.debug("memfd for a %d-byte shard unavailable (%s); using a bytearray", size, e)
        if self.memory is None:
            self.memory = bytearray(size)

    def load_torch(self) -> Any:
        try:
            if self.fd is not None:
                return torch.load(f"/proc/self/fd/{self.fd}", mmap=True, map_location="cpu",
                                  weights_only=True)
            return torch.load(ViewReader(memoryview(self.memory)), map_location="cpu",
                              weights_only=True)
        finally:
            self.close()

    def load_json(self) -> Any:
        try:
            return json.loads(bytes(self.memory))
        finally:
            self.close()

    def close(self) -> None:
        """Unmap our view of the file (torch's mapping keeps what the tensors use)."""
        if self.fd is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                self.memory.close()
            os.close(self.fd)
            self.fd = None
        self.memory = None


def _decode(info: CheckpointInfo, name: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - any decode failure means an unusable shard
        raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {name} cannot be decoded ({e})") from e


def load_checkpoint(storage: Storage, info: CheckpointInfo,
                    fetched: Callable[[str], tuple[bytes, str] | None] | None = None, *,
                    read: ReadConfig | None = None) -> dict[str, Any]:
    """Download every shard of ``info``, check size and digest, and deserialize it.
    ``fetched``: a shard's bytes already downloaded and their digest (``prefetch``), or None
    to download it. ``read``: how (``ReadConfig``; default from the environment): shards are
    read with parallel ranged reads into one buffer each (``ShardBuffer``), hashed as the
    bytes arrive, and loaded from that buffer while the next ones download.

    The digest is what ``FileEntry.restore_check`` names: for a shard streamed to S3 as a
    multipart upload, the store's composite SHA-256 of its parts (each part hashed by the
    thread that read it, so verification runs on every core); otherwise the whole sha256.

    Raises CorruptCheckpointError naming the shard if anything does not match the manifest.
    """
    if info.manifest is None:
        raise CorruptCheckpointError(f"checkpoint {info.uri} has no readable manifest: {info.reason}")
    d = step_dir_name(info.step)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    total = 0
    todo: dict[str, FileEntry] = {}
    for name, entry in sorted(info.manifest.files.items()):
        got = fetched(name) if fetched is not None else None
        if got is not None and (len(got[0]) != entry.size or got[1] != entry.restore_check()[1]):
            # Judged by what the store holds, never by a copy fetched earlier.
            log.warning("checkpoint %s: the prefetched shard %s does not match the manifest;"
                        " downloading it again", info.uri, name)
            got = None
        if got is None:
            todo[name] = entry
            continue
        data = got[0]
        total += len(data)
        out[name] = _decode(info, name, (lambda data=data: json.loads(data)) if name.endswith(".json")
                            else lambda data=data: torch.load(ViewReader(memoryview(data)),
                                                              map_location="cpu", weights_only=True))
    buffers: dict[str, ShardBuffer] = {}

    def alloc(key: str, size: int) -> Any:
        buffers[key] = ShardBuffer(size, mapped=not key.endswith(".json"))
        return buffers[key].memory

    names = {f"{d}/{name}": name for name in todo}
    try:
        objects = [(k, todo[n].size, todo[n].restore_check()[0]) for k, n in names.items()]
        for f in read_parallel(storage, objects, alloc, read or ReadConfig.from_env()):
            name, buf = names[f.key], buffers.pop(f.key)
            part, expected = todo[name].restore_check()
            if f.digest != expected:
                buf.close()
                what = "composite sha256 of its parts" if part else "sha256"
                raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {name} {what} mismatch")
            total += buf.size
            out[name] = _decode(info, name, buf.load_json if name.endswith(".json") else buf.load_torch)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {names.get(_key_of(e, names), '?')}"
                                     " is missing") from e
    except ObjectMismatchError as e:
        name = next((n for k, n in names.items() if e.uri.endswith("/" + k)), "?")
        raise CorruptCheckpointError(
            f"checkpoint {info.uri}: shard {name} has {e.size} bytes, manifest says {e.expected}") from e
    finally:
        for buf in buffers.values():  # allocated and never handed over: a read failed
            buf.close()
    log.info("loaded checkpoint %s: %.1f MB in %.2fs", info.uri, total / 1e6, time.perf_counter() - t0)
    return out


def _key_of(e: FileNotFoundError, names: dict[str, str]) -> str | None:
    """Which of ``names``' keys the storage's FileNotFoundError (its URI) is about."""
    uri = str(e.args[0]) if e.args else ""
    return next((k for k in names if uri.endswith("/" + k)), None)
