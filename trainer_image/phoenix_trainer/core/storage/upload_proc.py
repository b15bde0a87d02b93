"""Streamed S3 uploads in a helper process, so botocore's Python runs on its own GIL.

An asynchronous checkpoint's upload thread shares the interpreter lock with the training
loop, and the loop needs the lock back after every torch call. Once the copies stopped
holding it (``buffers.py``), what was left was botocore itself: building, signing and
parsing each request is a few milliseconds of Python, a dozen requests per checkpoint,
and a loop that waits for the lock behind them loses several per cent of its steps on a
2-core machine (benchmarks/README.md, ``bench_checkpoint.py``). The bytes cannot avoid
the trainer (``torch.save`` runs there), but the requests can.

``UploadProcess.start`` starts ``python -m phoenix_trainer.core.storage.upload_child`` and
hands it the client's settings (credentials travel over the pipe, never argv or env); the
upload thread then streams objects to it: the trainer's side (``ProcStreamWriter``) writes framed
bytes into a pipe, which drops the GIL for each write; the child feeds them to the same
``s3._S3StreamWriter`` an in-process upload uses (parts, checksums, abort on any error) and
answers the commit with the ``FileEntry``. One object at a time; while one is streaming,
another thread's upload stays in its own process, as does every upload before the child is
started and once it has died (``PHOENIX_UPLOAD_PROCESS=0``: always). The child runs
``PHOENIX_CHECKPOINT_NICE`` levels below the thread that started it, as the upload thread
does, and exits when told to (``close``) or when the pipe closes.

Only the thread that forks this process's workers may start the child (the checkpointer's
``save``, on the training loop; ``Storage.prepare_uploads``). ``Popen`` waits for the exec on
a pipe whose write end every process forked meanwhile inherits: started from the upload
thread while the loop's DataLoader forked its workers for a new epoch, the child ran but the
``Popen`` waited for those workers to exit - and the upload with it, and the loop behind the
upload at its next checkpoint, for good (``test_own_loops.py``: in one CI run, then in 2 of
4 runs beside two busy processes).

Stdlib only on the trainer's side; the child imports boto3 (through ``s3``), never torch.
"""
from __future__ import annotations

import json
import logging
import os
import select
import struct
import subprocess
import sys
import threading
from typing import IO, Any

from ..errors import StorageError
from .entry import FileEntry

log = logging.getLogger("phoenix.storage")

CHILD_MODULE = "phoenix_trainer.core.storage.upload_child"  # the child's side
_HEADER = struct.Struct("<cQ")  # kind, payload length
CONFIG, OPEN, DATA, COMMIT, ABORT, QUIT = b"C", b"O", b"D", b"E", b"A", b"Q"
REPLY = b"R"  # JSON: {"entry": {...}} after a commit, {} after an abort, {"error": "..."}
PIPE_BYTES = 1 << 20  # the pipe's capacity, raised from 64 KiB: fewer, larger writes
FRAME_BYTES = 8 << 20  # a write is sent in frames of at most this: the child's memory stays bounded
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux); named in fcntl only from Python 3.10


def send(f: IO[bytes], kind: bytes, payload: Any = b"") -> None:
    view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    f.write(_HEADER.pack(kind, len(view)))
    if len(view):
        f.write(view)  # a large write goes straight to the pipe, the GIL dropped meanwhile


def read_into(f: IO[bytes], view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise EOFError("the other side closed the pipe")
        got += n


def recv_header(f: IO[bytes]) -> tuple[bytes, int]:
    head = bytearray(_HEADER.size)
    read_into(f, memoryview(head))
    kind, n = _HEADER.unpack(head)
    return kind, n


def recv(f: IO[bytes]) -> tuple[bytes, bytes]:
    kind, n = recv_header(f)
    payload = bytearray(n)
    read_into(f, memoryview(payload))
    return kind, bytes(payload)


def entry_json(e: FileEntry) -> dict:
    return {"size": e.size, "sha256": e.sha256, "stored_checksum": e.stored_checksum,
            "part_size": e.part_size, "confirmed": e.confirmed}


def entry_from_json(d: dict) -> FileEntry:
    return FileEntry(size=int(d["size"]), sha256=str(d["sha256"]),
                     stored_checksum=d.get("stored_checksum"), part_size=d.get("part_size"),
                     confirmed=bool(d.get("confirmed")))


class UploadProcess:
    """The helper process of one S3 client (shared by the storages ``child()`` makes)."""

    def __init__(self, client_args: dict[str, Any], part_size: int, concurrency: int) -> None:
        self._config = {"client": client_args, "part_size": part_size, "concurrency": concurrency}
        self._busy = threading.Lock()  # one object at a time
        self._proc: subprocess.Popen | None = None
        self._owner = 0  # the pid that started it
        self.dead: str | None = None  # why uploads stay in the trainer's process from now on

    def writer(self, bucket: str, key: str, size_hint: int | None) -> "ProcStreamWriter | None":
        """A writer streaming ``key`` through the child; None when the child is busy with
        another object or has died (the caller uploads in its own process then)."""
        if self.dead or not self._busy.acquire(blocking=False):
            return None
        proc = self._running()
        if proc is None:  # not started by this process (start()), or gone
            self._busy.release()
            return None
        try:
            send(proc.stdin, OPEN, json.dumps({"bucket": bucket, "key": key,
                                                "size_hint": size_hint}).encode())
        except (OSError, ValueError) as e:
            self._died(f"could not be reached: {e}")
            self._busy.release()
            return None
        return ProcStreamWriter(self, proc)

    def start(self) -> bool:
        """Start the child unless it runs for this process already; whether it runs now.

        Call it only from the thread that forks this process's workers (see the module
        docstring: started from another thread, the ``Popen`` can wait for as long as a
        worker forked meanwhile lives). A no-op while an upload is streaming or once the
        child has died; a forked copy of the trainer (the child is its parent's) starts its
        own."""
        if self.dead or not self._busy.acquire(blocking=False):
            return False
        try:
            if self._running() is not None:
                return True
            env = {**os.environ, "PHOENIX_UPLOAD_PROCESS": "0", "PYTHONPATH": os.pathsep.join(
                p for p in sys.path if p)}  # the child imports this package as the trainer did
            try:
                proc = subprocess.Popen([sys.executable, "-m", CHILD_MODULE],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                        close_fds=True)
            except OSError as e:
                self._died(f"could not start: {e}")
                return False
            try:
                import fcntl

                fcntl.fcntl(proc.stdin.fileno(), _F_SETPIPE_SZ, PIPE_BYTES)
            except (ImportError, OSError):  # not Linux, or above pipe-max-size: the default size
                pass
            self._proc, self._owner = proc, os.getpid()
            try:
                send(proc.stdin, CONFIG, json.dumps(self._config).encode())
                proc.stdin.flush()
            except (OSError, ValueError) as e:
                self._died(f"could not be reached: {e}")
                return False
            return True
        finally:
            self._busy.release()

    def pid(self) -> int | None:
        proc = self._running()
        return proc.pid if proc is not None else None

    def _running(self) -> subprocess.Popen | None:
        """The child, if this process started it and it has not exited."""
        if self._proc is None or self._owner != os.getpid() or self._proc.poll() is not None:
            return None
        return self._proc

    def _died(self, why: str) -> None:
        if self.dead is None:
            self.dead = why
            log.warning("the upload process %s; uploads stay in the trainer's process", why)
        if self._proc is not None and self._owner == os.getpid():  # never a parent's child
            self._proc.kill()
            self._proc.wait()

    def close(self) -> None:
        if self._running() is not None:
            try:
                # Told, not left to see the end of its input: a worker forked after the child
                # started holds a copy of this pipe, and the end comes only when it exits.
                send(self._proc.stdin, QUIT)
                self._proc.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class ProcStreamWriter:
    """``Storage.open_write``'s writer for an object the helper process uploads."""

    def __init__(self, owner: UploadProcess, proc: subprocess.Popen) -> None:
        self.owner, self.proc, self.done = owner, proc, False

    def write(self, data: Any) -> int:
        if self.done:
            raise ValueError("write after commit or abort")
        view = memoryview(data).cast("B")
        self._early_error()
        try:
            for off in range(0, len(view), FRAME_BYTES):
                send(self.proc.stdin, DATA, view[off:off + FRAME_BYTES])
        except OSError as e:
            self.owner._busy.release()
            raise self._lost(e) from e
        return len(view)

    def flush(self) -> None:
        pass

    def commit(self) -> FileEntry:
        reply = self._finish(COMMIT)
        if "entry" not in reply:
            raise StorageError(f"S3 upload failed in the upload process: {reply.get('error')}")
        return entry_from_json(reply["entry"])

    def abort(self) -> None:
        if not self.done:
            try:
                self._finish(ABORT)
            except StorageError:
                pass  # the child is gone: nothing of this object was completed

    def _finish(self, kind: bytes) -> dict:
        self.done = True
        try:
            send(self.proc.stdin, kind)
            self.proc.stdin.flush()
            got, payload = recv(self.proc.stdout)
            if got != REPLY:
                raise EOFError(f"unexpected reply {got!r}")
            return json.loads(payload)
        except (OSError, EOFError, ValueError) as e:
            raise self._lost(e) from e
        finally:
            self.owner._busy.release()

    def _early_error(self) -> None:
        """A part that failed stops the stream at the next write, as in-process: the child
        says so at once instead of reading the rest."""
        if select.select([self.proc.stdout], [], [], 0)[0]:
            self.done = True
            try:
                got, payload = recv(self.proc.stdout)
                why = json.loads(payload).get("error", "?") if got == REPLY else f"reply {got!r}"
            except (OSError, EOFError, ValueError) as e:
                raise self._lost(e) from e
            finally:
                self.owner._busy.release()
            raise StorageError(f"S3 upload failed in the upload process: {why}")

    def _lost(self, e: BaseException) -> StorageError:
        self.done = True
        self.owner._died(f"ended mid-upload ({e.__class__.__name__}: {e})")
        return StorageError(f"the upload process ended mid-upload ({e}); retried in-process")
