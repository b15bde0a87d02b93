"""Gather checkpoint facts for ``decide``: list and verify checkpoints in storage; and the
two writes the operator makes there: the fence that supersedes older attempts (and promotes
a standby), and the control document with its requests to the running attempt.

Blocking (S3 / filesystem); run in a thread. The operator trusts only what it verified
here: a checkpoint is offered for resume iff its manifest validates (and, with deep
verification, every shard's sha256 matches).
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Iterable
from urllib.parse import unquote, urlparse

from phoenix_trainer.layout import (CONTROL_NAME, FENCE_NAME, Control, Fence, checkpoint_steps,
                                    read_fence)
from phoenix_trainer.storage import open_storage, verify_checkpoint

from .decide import Checkpoint, Listing
from .model import JobSpec, parse_ts

log = logging.getLogger("phoenix.facts")

VALID_WANTED = 2  # the newest valid one plus one to fall back to


_bucket_lock = threading.Lock()


def _bucket(bucket: str, endpoint: str | None, access_key: str | None, secret_key: str | None,
            region: str | None):
    """One storage handle (one boto3 client) per bucket and credentials, shared by every job
    and phase: a client costs ~150 ms of CPU to create and ~10 MB to keep, and boto3
    clients are thread-safe.

    Under a lock: ``lru_cache`` does not stop concurrent misses from each building the value,
    and the API worker threads all ask at once when many jobs start together - 16 threads
    built 16 clients, 270 MB of RSS the allocator kept after 15 of them were dropped
    (benchmarks/bench_scale.py)."""
    with _bucket_lock:
        return _new_bucket(bucket, endpoint, access_key, secret_key, region)


@functools.lru_cache(maxsize=32)
def _new_bucket(bucket: str, endpoint: str | None, access_key: str | None,
                secret_key: str | None, region: str | None):
    return open_storage(f"s3://{bucket}", endpoint_url=endpoint, access_key=access_key,
                        secret_key=secret_key, region=region)


def _storage(uri: str, endpoint: str | None, access_key: str | None, secret_key: str | None,
             region: str | None):
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        return open_storage(uri)
    root = _bucket(parsed.netloc, endpoint, access_key, secret_key, region)
    prefix = unquote(parsed.path).strip("/")
    return root.child(prefix) if prefix else root


def scan(spec: JobSpec, phase: str, *, access_key: str | None, secret_key: str | None,
         endpoint: str | None, skipped: Iterable[int] = (), deep: bool = True) -> Listing:
    """Verify newest-first until ``VALID_WANTED`` usable checkpoints are found."""
    uri = spec.checkpoint.phase_uri(phase)
    started = time.monotonic()
    try:
        storage = _storage(uri, endpoint, access_key, secret_key, spec.checkpoint.region)
        fence = read_fence(storage)  # who holds the prefix (decide._fence_floor)
        skip = set(skipped)
        found: list[Checkpoint] = []
        usable = 0
        for step in reversed(checkpoint_steps(storage)):
            info = verify_checkpoint(storage, step, deep=deep)
            m = info.manifest
            exact = m.extra.get("resumeExact") if m else None
            found.append(Checkpoint(step=step, uri=info.uri, valid=info.valid,
                                    reason=info.reason, epoch=m.epoch if m else None,
                                    time=_time(m.time) if m else None,
                                    resume_exact=exact if isinstance(exact, bool) else None,
                                    resume_exact_reason=str(m.extra.get("resumeExactReason") or "")
                                    if m else ""))
            if info.valid and step not in skip:
                usable += 1
                if usable >= VALID_WANTED:
                    break
    except Exception as e:  # noqa: BLE001 - any storage trouble becomes a retry, with the why
        log.warning("listing checkpoints under %s failed: %s", uri, e)
        return Listing(error=f"{type(e).__name__}: {e}"[:300])
    log.info("verified %d checkpoint(s) under %s in %.2fs", len(found), uri,
             time.monotonic() - started)
    return Listing(tuple(found), fence=fence)


def write_fence(spec: JobSpec, phase: str, attempt: int, pod: str, when: str, *,
                access_key: str | None, secret_key: str | None, endpoint: str | None,
                resume_from: str | None = None, uid: str = "", job: str = "",
                clear_control: bool = False) -> str:
    """Write ``<phase prefix>/fence.json`` naming ``attempt`` of the job ``uid`` (``job``:
    namespace/name): from now on every other attempt's commit and retention are refused
    (``phoenix_trainer.writer.check_fence``); a standby of that attempt starts, from
    ``resume_from``. ``clear_control``: a new attempt starts, so requests left for an older
    one (or a deleted job's) go. Returns where it was written."""
    uri = spec.checkpoint.phase_uri(phase)
    storage = _storage(uri, endpoint, access_key, secret_key, spec.checkpoint.region)
    storage.put_bytes(FENCE_NAME, Fence(attempt, pod, when, resume_from or "", uid=uid,
                                        job=job).to_json().encode())
    if clear_control:
        storage.delete(CONTROL_NAME)
    return storage.uri_for(FENCE_NAME)


def write_control(spec: JobSpec, phase: str, control: Control, *, access_key: str | None,
                  secret_key: str | None, endpoint: str | None) -> str:
    """Write ``<phase prefix>/control.json``: requests to the phase's running attempt."""
    uri = spec.checkpoint.phase_uri(phase)
    storage = _storage(uri, endpoint, access_key, secret_key, spec.checkpoint.region)
    storage.put_bytes(CONTROL_NAME, control.to_json().encode())
    return storage.uri_for(CONTROL_NAME)


def _time(value: str | None):
    try:
        return parse_ts(value)
    except (TypeError, ValueError):
        return None
