"""Committing a checkpoint directory: shards first, manifest last, then retention.

Torch-free so it can be unit-tested (and reused by tools) without a model: callers hand in
files that are already serialized, or ``StreamedShard``s that serialize themselves straight
into storage (no local copy; see ``Storage.open_write``). Everything here runs on the checkpoint upload thread,
never on the training step path. It must never make a checkpoint look valid before every
shard is stored: the manifest is the commit record and goes up last.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import IO, Callable, Iterable, TypeVar, Union

from .errors import CheckpointError, StorageError, SupersededError
from .handshake import check_fence, read_fence
from .layout import (
    MANIFEST_NAME, CheckpointInfo, Manifest, checkpoint_steps, step_dir_name, verify_checkpoint,
)
from .storage import FileEntry, Storage

log = logging.getLogger("phoenix.checkpoint")
T = TypeVar("T")


@dataclass(frozen=True)
class StreamedShard:
    """A shard written straight into storage: ``produce(f)`` writes its bytes to ``f``.

    It may be called more than once (a retry writes the whole shard again), so it must
    produce the same bytes each time, e.g. ``torch.save`` of an immutable snapshot."""

    produce: Callable[[IO[bytes]], object]
    size_hint: int | None = None  # expected bytes (S3 part sizing); may be off


Source = Union[str, os.PathLike, StreamedShard]  # a file already on disk, or a stream


def stream_object(storage: Storage, key: str, shard: StreamedShard) -> FileEntry:
    """Write ``shard`` to ``key`` through ``storage.open_write``: size and sha256 computed on
    the way, the object visible only if everything got there, nothing left if not."""
    w = storage.open_write(key, size_hint=shard.size_hint)
    try:
        shard.produce(w)
        return w.commit()
    except BaseException:
        w.abort()
        raise


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter for S3 operations that failed as a whole."""

    attempts: int = 6
    initial_seconds: float = 0.5
    max_seconds: float = 8.0
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, failure: int) -> float:
        cap = min(self.max_seconds, self.initial_seconds * (2 ** failure))
        # "Equal jitter": never retry instantly, but spread retries from many pods apart.
        return cap / 2 + self.rng.uniform(0, cap / 2)

    def run(self, what: str, fn: Callable[[], T]) -> T:
        for failure in range(self.attempts):
            try:
                return fn()
            except (StorageError, OSError) as e:
                if isinstance(e, FileNotFoundError) or failure == self.attempts - 1:
                    raise
                d = self.delay(failure)
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, e, failure + 1,
                            self.attempts - 1, d)
                self.sleep(d)
        raise AssertionError("unreachable")


def file_digest(path: str | os.PathLike) -> FileEntry:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            n += len(block)
            h.update(block)
    return FileEntry(size=n, sha256=h.hexdigest())


def utcnow_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def commit_checkpoint(storage: Storage, step: int, files: dict[str, Source], *,
                      epoch: int, phase: str, config_fingerprint: str, run_id: str = "",
                      attempt: int | None = None, extra: dict | None = None,
                      digests: dict[str, FileEntry] | None = None,
                      retry: RetryPolicy | None = None, uid: str = "") -> CheckpointInfo:
    """Upload ``files`` into ``step-N/`` and write the manifest last. Returns the new info.

    Fenced (``check_fence``): refused before the first byte, before the manifest, and undone
    if the fence moved while the manifest was being written."""
    digests = upload_shards(storage, step, files, attempt=attempt, digests=digests, retry=retry,
                            uid=uid)
    return publish_manifest(storage, step, digests, epoch=epoch, phase=phase,
                            config_fingerprint=config_fingerprint, run_id=run_id,
                            attempt=attempt, extra=extra, retry=retry, uid=uid)


def _fence(storage: Storage, attempt: int | None, step: int, what: str, retry: RetryPolicy,
           uid: str = "") -> None:
    retry.run(f"read the fence of {storage.uri}",
              lambda: check_fence(storage, attempt, f"{what} checkpoint step {step}", uid))


def upload_shards(storage: Storage, step: int, files: dict[str, Source], *,
                  attempt: int | None = None, digests: dict[str, FileEntry] | None = None,
                  retry: RetryPolicy | None = None, uid: str = "") -> dict[str, FileEntry]:
    """The first half of a commit: upload ``files`` into ``step-N/`` (no manifest yet) and
    return their entries for it. Every rank of a gang does this for its own files."""
    retry = retry or RetryPolicy()
    d = step_dir_name(step)
    _fence(storage, attempt, step, "write", retry, uid)
    digests = dict(digests or {})
    for name, src in files.items():
        if name not in digests and not isinstance(src, StreamedShard):
            digests[name] = file_digest(src)
    # A manifest left from an earlier attempt at this step must not vouch for shards we are
    # about to overwrite: remove it first, so the directory is invalid until we finish.
    retry.run(f"clear old manifest of {storage.uri_for(d)}",
              lambda: storage.delete(f"{d}/{MANIFEST_NAME}"))
    for name, src in files.items():
        key, uri = f"{d}/{name}", storage.uri_for(f"{d}/{name}")
        if isinstance(src, StreamedShard):
            # Serialized again from memory on a retry: a stream cannot be rewound.
            digests[name] = retry.run(f"stream {uri}",
                                      lambda key=key, src=src: stream_object(storage, key, src))
        else:
            retry.run(f"upload {uri}", lambda key=key, src=src: storage.put_file(key, src))
        # What the store recorded (it checked the upload against the checksums sent with
        # it): the manifest keeps it so readers can verify with a HEAD, no download. A
        # stream the store's own reply confirmed (the checksum of exactly the bytes hashed
        # and counted on the way) needs no HEAD to learn it.
        if digests[name].confirmed:
            continue
        size, stored = retry.run(f"stat {uri}", lambda key=key: storage.stat(key))
        if size != digests[name].size:
            raise StorageError(f"{uri} has {size} bytes after upload, {digests[name].size} were sent")
        expected = digests[name].stored_checksum
        if stored and expected and stored != expected:
            # A streamed shard's writer computed the checksum the store should record from
            # the very bytes it hashed; anything else is not what we sent.
            raise StorageError(f"{uri}: the store recorded checksum {stored}, the bytes sent"
                               f" give {expected}")
        if stored:
            digests[name] = replace(digests[name], stored_checksum=stored)
    return {name: digests[name] for name in files}


def publish_manifest(storage: Storage, step: int, digests: dict[str, FileEntry], *, epoch: int,
                     phase: str, config_fingerprint: str, run_id: str = "",
                     attempt: int | None = None, extra: dict | None = None,
                     retry: RetryPolicy | None = None, uid: str = "") -> CheckpointInfo:
    """The second half: write the manifest listing every uploaded file (all ranks' files,
    for a gang), fenced before and after."""
    retry = retry or RetryPolicy()
    d = step_dir_name(step)
    manifest = Manifest(step=step, epoch=epoch, phase=phase, time=utcnow_iso(),
                        config_fingerprint=config_fingerprint, files=dict(digests), run_id=run_id,
                        attempt=attempt, extra=dict(extra or {}))
    body = manifest.to_json().encode()
    _fence(storage, attempt, step, "publish", retry, uid)
    retry.run(f"write manifest {storage.uri_for(d)}",
              lambda: storage.put_bytes(f"{d}/{MANIFEST_NAME}", body))
    try:
        _fence(storage, attempt, step, "keep", retry, uid)
    except SupersededError:
        # The successor started while we wrote: take our manifest back (if still ours) -
        # unless the fence that superseded us names this very checkpoint as the one to resume
        # from (the operator listed and picked it in between): the successor reads it, and
        # taking it back would send it to an older step.
        with contextlib.suppress(Exception):
            fence = read_fence(storage)
            named = fence is not None and fence.resume_from.rstrip("/") == \
                storage.uri_for(d).rstrip("/")
            if not named and Manifest.from_json(
                    storage.get_bytes(f"{d}/{MANIFEST_NAME}")).attempt == attempt:
                storage.delete(f"{d}/{MANIFEST_NAME}")
        raise
    return CheckpointInfo(step, storage.uri_for(d), manifest, True, "ok")


def apply_retention(storage: Storage, keep: int, protect: Iterable[int] = (),
                    attempt: int | None = None, uid: str = "",
                    known_valid: Iterable[int] = ()) -> list[int]:
    """Keep the newest ``keep`` valid checkpoints; delete older ones and stale partial dirs.

    Never deletes a protected step (the one this attempt resumed from) and never touches a
    partial directory newer than the newest valid checkpoint (it may be a save in flight).
    A superseded ``attempt`` deletes nothing (``SupersededError``; checked before each step).

    Steps are checked newest first and only until ``keep`` valid ones are found: everything
    older goes whether valid or not, so it is not read. ``known_valid`` are steps the caller
    committed and verified itself in this attempt (``AsyncCheckpointer``): under the fence
    nobody else deletes in this prefix, so they are taken as valid without a manifest GET
    and a HEAD per shard - at a checkpoint every minute, that was most of a save's requests.
    """
    if keep < 2:
        raise CheckpointError(f"keep={keep} would leave nothing to fall back to; use keep >= 2")
    check_fence(storage, attempt, "apply retention", uid)
    protected, known = set(protect), set(known_valid)
    valid: list[int] = []  # newest first, at most ``keep``
    doomed: list[int] = []
    for step in reversed(checkpoint_steps(storage)):
        if len(valid) >= keep:
            doomed.append(step)
        elif step in known or verify_checkpoint(storage, step, deep=False).valid:
            valid.append(step)
        elif valid:
            doomed.append(step)  # invalid and older than a valid one: a stale partial dir
    deleted = []
    for step in sorted(set(doomed)):
        if step in protected:
            continue
        d = step_dir_name(step)
        check_fence(storage, attempt, f"delete checkpoint step {step}", uid)
        # Manifest first: a crash half-way through leaves an invalid dir, never a "valid"
        # checkpoint with missing shards.
        storage.delete(f"{d}/{MANIFEST_NAME}")
        storage.delete_prefix(d)
        deleted.append(step)
    if deleted:
        log.info("retention (keep=%d) deleted steps %s under %s", keep, deleted, storage.uri)
    return deleted
