"""Read objects with parallel ranged reads, straight into buffers the caller allocates, and
hash each one as its bytes arrive: sha256 in byte order, or, for an object named with its
upload's part size, every part on its own and S3's composite of them.

One connection caps a download at a fraction of a NIC; s5cmd-style ranged GETs fill it.
``read_parallel`` cuts every object into ranges of ``part_size`` and keeps ``concurrency``
of them in flight over all objects together (one pool, ranges queued object by object, so
the first object finishes first and later ones fill the idle connections). An object is
admitted (its buffer allocated) only while the buffers handed out and not yet released stay
within ``memory_bytes``: one object is always admitted, however big. Each range is read by
``Storage.read_into`` into its slice of the object's buffer: no chunk list, no joined copy.

Ranges finish out of order but sha256 is sequential: a finished range is recorded, and the
one thread that finds the next range in order done hashes forward over the contiguous prefix
(``InOrderDigest``), off the lock, while the other threads keep reading. That one sequential
pass is a core's worth of SHA-256 per object, which a fast link outruns on a CPU without
SHA instructions. An object given as ``(key, size, part_size)`` (the part size of the
multipart upload that wrote it) is hashed part by part instead: its ranges are cut at part
boundaries, each part has its own ``InOrderDigest``, so every reading thread hashes the part
it just read, and ``Fetched.composite`` is S3's composite checksum of those digests
(``entry.composite_sha256``), the one the writer recorded. Every range also
reports the object's total size (S3: ``Content-Range``), so an object shorter or longer
than expected is refused (``ObjectMismatchError``) even when no range reaches its end.

Bounded: a failed range is retried ``attempts`` times (a ``StorageError``: a dropped
connection, a timeout), then the read fails; nothing here loops without a cap. Standard
library only: no torch, no boto3 (the backends' ``read_into`` own those).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..contract import ENV_RESTORE_CONCURRENCY, ENV_RESTORE_MEMORY_MB, ENV_RESTORE_PART_MB
from ..errors import ObjectMismatchError, StorageError
from .entry import composite_sha256

log = logging.getLogger("phoenix.storage")
MiB = 1 << 20


@dataclass(frozen=True)
class ReadConfig:
    """How a restore reads: ranges of ``part_size`` bytes, ``concurrency`` in flight over all
    objects, at most ``memory_bytes`` of buffers handed out at once (one object always)."""

    part_size: int = 8 * MiB  # big enough that a GET's latency is small next to its transfer
    concurrency: int = 8  # about what fills a 10-25 Gbit/s NIC from S3; the client pools 16
    memory_bytes: int = 1024 * MiB  # objects read ahead of the one being consumed
    attempts: int = 3  # per range

    def __post_init__(self) -> None:
        if self.part_size < 1 or self.concurrency < 1 or self.memory_bytes < 0 or self.attempts < 1:
            raise ValueError(f"invalid {self!r}: part_size, concurrency and attempts must be >= 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ReadConfig":
        env = os.environ if environ is None else environ

        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None
            if value <= 0:
                raise ValueError(f"{name}={raw!r} must be > 0")
            return value

        d = cls()
        return cls(part_size=int(number(ENV_RESTORE_PART_MB, d.part_size / MiB) * MiB),
                   concurrency=int(number(ENV_RESTORE_CONCURRENCY, d.concurrency)),
                   memory_bytes=int(number(ENV_RESTORE_MEMORY_MB, d.memory_bytes / MiB) * MiB))


class InOrderDigest:
    """sha256 of a buffer filled range by range in any order: ``done(offset, n)`` after a
    range is in place; whoever completes the next range in order hashes forward while the
    prefix stays contiguous. Thread-safe; exactly one thread hashes at a time."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.h = hashlib.sha256()
        self.hashed = 0  # bytes [0, hashed) are in the digest
        self._done: dict[int, int] = {}  # offset -> length, finished and not yet hashed
        self._busy = False
        self._lock = threading.Lock()

    def done(self, offset: int, n: int) -> None:
        with self._lock:
            self._done[offset] = n
            if self._busy:
                return  # the hashing thread will find it before it stops
            self._busy = True
        while True:
            with self._lock:
                n = self._done.pop(self.hashed, None)
                if n is None:
                    self._busy = False
                    return
                start = self.hashed
            self.h.update(self.view[start:start + n])  # releases the GIL: reads go on
            with self._lock:
                self.hashed = start + n

    def _complete(self) -> None:
        if self.hashed != len(self.view):
            raise RuntimeError(f"{self.hashed} of {len(self.view)} bytes hashed")

    def hexdigest(self) -> str:
        self._complete()
        return self.h.hexdigest()

    def digest(self) -> bytes:
        self._complete()
        return self.h.digest()


@dataclass
class Fetched:
    """One object read whole: its key, the caller's buffer holding it, and its digest: the
    sha256 of the whole (hex), or for an object read with its upload's part size, S3's
    composite checksum of its parts (``composite``; ``sha256`` is then None)."""

    key: str
    buffer: Any
    sha256: str | None
    seconds: float  # from its first range requested to its last byte hashed
    composite: str | None = None

    @property
    def digest(self) -> str:
        """What to compare with ``FileEntry.restore_check()``'s expected value."""
        return self.composite if self.composite is not None else self.sha256  # type: ignore[return-value]


class _ObjectRead:
    """The ranges of one object and their futures; the first failure wins."""

    def __init__(self, storage: Any, key: str, size: int, buffer: Any, config: ReadConfig,
                 pool: ThreadPoolExecutor, upload_part: int | None = None,
                 digest: bool = True) -> None:
        self.storage, self.key, self.size, self.buffer = storage, key, size, buffer
        self.view = memoryview(buffer).cast("B")
        if len(self.view) != size:
            raise ValueError(f"buffer for {key} has {len(self.view)} bytes, not {size}")
        if upload_part is not None and upload_part < 1:
            raise ValueError(f"{key}: upload part size {upload_part} must be >= 1")
        self.config = config
        # Digest "parts": the whole object, or each upload part; ranges never cross one.
        self.upload_part = upload_part if size else None  # an empty object: nothing to part
        span = self.upload_part or max(size, 1)
        self.digests = ([InOrderDigest(self.view[p:p + span]) for p in range(0, size, span)]
                        or [InOrderDigest(self.view)]) if digest else []
        self.span = span
        self.failed: BaseException | None = None
        self.t0 = time.perf_counter()
        self.futures: list[Future] = [
            pool.submit(self._range, off, min(config.part_size, p + span - off, size - off))
            for p in range(0, size, span)
            for off in range(p, min(p + span, size), config.part_size)
        ] or [pool.submit(self._range, 0, 0)]  # an empty object: still check it is there, empty

    def _range(self, offset: int, n: int) -> None:
        if self.failed is not None:
            return  # another range failed: do not fetch the rest
        try:
            for attempt in range(1, self.config.attempts + 1):
                try:
                    total = self.storage.read_into(self.key, offset, self.view[offset:offset + n])
                    break
                except StorageError as e:
                    if attempt == self.config.attempts:
                        raise
                    log.warning("read of %s bytes %d-%d failed (%s); retry %d of %d",
                                self.storage.uri_for(self.key), offset, offset + n, e, attempt,
                                self.config.attempts - 1)
                    time.sleep(0.2 * 2 ** (attempt - 1))
            if total != self.size:
                raise ObjectMismatchError(self.storage.uri_for(self.key), total, self.size)
            if self.digests:
                part = offset // self.span
                self.digests[part].done(offset - part * self.span, n)  # this thread hashes it
        except BaseException as e:
            if self.failed is None:
                self.failed = e
            raise

    def result(self) -> Fetched:
        for f in self.futures:
            f.exception()  # wait for all: none may still be writing into the buffer
        if self.failed is not None:
            raise self.failed
        for f in self.futures:
            f.result()
        if not self.digests:
            sha, composite = None, None
        elif self.upload_part:
            sha, composite = None, composite_sha256([d.digest() for d in self.digests])
        else:
            sha, composite = self.digests[0].hexdigest(), None
        for d in self.digests:
            d.view.release()
        self.view.release()
        return Fetched(self.key, self.buffer, sha, time.perf_counter() - self.t0, composite)

    def cancel(self) -> None:
        self.failed = self.failed or RuntimeError("cancelled")
        for f in self.futures:
            f.cancel()
        for f in self.futures:
            if not f.cancelled():
                f.exception()
        for d in self.digests:
            d.view.release()
        self.view.release()


def read_parallel(storage: Any, objects: Sequence[tuple[str, int] | tuple[str, int, int | None]],
                  alloc: Callable[[str, int], Any], config: ReadConfig | None = None,
                  digest: bool = True) -> Iterator[Fetched]:
    """Read every ``(key, size)`` of ``objects`` into a buffer from ``alloc(key, size)`` (any
    writable buffer of exactly ``size`` bytes), yielding them in the given order, whole and
    hashed (``(key, size, part_size)``: hashed per upload part, ``Fetched.composite``; a
    ``part_size`` of None is the whole sha256; ``digest=False``: not hashed, for a caller that
    checks the bytes its own way, e.g. per block). A yielded buffer counts against
    ``memory_bytes`` until the next one is asked for. Raises ``FileNotFoundError`` (absent), ``ObjectMismatchError`` (another size) or
    ``StorageError`` (after the retries) for the first object that fails; reads still in
    flight are cancelled or awaited before it propagates."""
    config = config or ReadConfig()
    todo = deque(objects)
    reads: deque[_ObjectRead] = deque()
    held = 0  # bytes of buffers allocated and not yet released by the consumer
    pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="phoenix-read")
    try:
        while todo or reads:
            while todo and (not reads or held + todo[0][1] <= config.memory_bytes):
                key, size, *part = todo.popleft()
                reads.append(_ObjectRead(storage, key, size, alloc(key, size), config, pool,
                                         part[0] if part else None, digest))
                held += size
            r = reads.popleft()
            fetched = r.result()
            yield fetched
            held -= r.size
    finally:
        for r in reads:
            r.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
