"""The operator's door to a phase's checkpoint prefix: list and verify checkpoints (for the
gather step), read the fence and the running attempt's heartbeats, read the attempt logs and
the history; the history's append (``append_history``); and the two writes the operator makes there, through
``phoenix_trainer.core.handshake`` (their one writer): the fence that supersedes older attempts (and promotes
a standby), and the control document with its requests to the running attempt.

Blocking (S3 / filesystem); run in a thread. The operator trusts only what it verified
here: a checkpoint is offered for resume iff its manifest validates (and, with deep
verification, every shard's sha256 matches).
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import Iterable, Sequence

from phoenix_trainer.core import handshake
from phoenix_trainer.core.handshake import Control, Fence, LeaderTerm, read_fence
from phoenix_trainer.core.errors import StaleLeaderError
from phoenix_trainer.core.heartbeat import Heartbeat, heartbeat_prefix
from phoenix_trainer.core.layout import HISTORY_KEY, checkpoint_steps, metrics_key, verify_checkpoint
from phoenix_trainer.core.storage import Credentials, open_storage

from . import history
from .decide import Checkpoint, Listing
from .phoenixjob import JobSpec, parse_ts

log = logging.getLogger("phoenix.storage")

VALID_WANTED = 2  # the newest valid one plus one to fall back to


_bucket_lock = threading.Lock()


def _bucket(root_uri: str, credentials: Credentials | None):
    """One storage handle (one boto3 client) per bucket and credentials, shared by every job
    and phase: a client costs ~150 ms of CPU to create and ~10 MB to keep, and boto3
    clients are thread-safe.

    Under a lock: ``lru_cache`` does not stop concurrent misses from each building the value,
    and the API worker threads all ask at once when many jobs start together - 16 threads
    built 16 clients, 270 MB of RSS the allocator kept after 15 of them were dropped
    (benchmarks/bench_scale.py)."""
    with _bucket_lock:
        return _new_bucket(root_uri, credentials)


@functools.lru_cache(maxsize=32)
def _new_bucket(root_uri: str, credentials: Credentials | None):
    return _open_bucket(root_uri, credentials=credentials)


def _open_bucket(root_uri: str, *, credentials: Credentials | None):
    return open_storage(root_uri, credentials)


def _storage(uri: str, credentials: Credentials):
    return open_storage(uri, credentials, bucket_root=_bucket)


def scan(spec: JobSpec, phase: str, *, credentials: Credentials, skipped: Iterable[int] = (),
         deep: bool = True) -> Listing:
    """Verify newest-first until ``VALID_WANTED`` usable checkpoints are found.
    ``credentials``: ``Gather.storage_access``'s (invariant 4)."""
    uri = spec.checkpoint.phase_uri(phase)
    started = time.monotonic()
    try:
        storage = _storage(uri, credentials)
        fence = read_fence(storage)  # who holds the prefix (decide.attempts.fence_floor)
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


def read_heartbeats(spec: JobSpec, phase: str, attempt: int, *,
                    credentials: Credentials) -> tuple[list[Heartbeat], dict[int, str]]:
    """The heartbeats of ``attempt``'s ranks (``core.heartbeat``), one LIST and one small GET
    per rank; malformed ones are skipped. Also the URIs of the stack dumps they name."""
    storage = _storage(spec.checkpoint.phase_uri(phase), credentials)
    beats: list[Heartbeat] = []
    dumps: dict[int, str] = {}
    for key in storage.list_keys(heartbeat_prefix(attempt)):
        if not key.endswith(".json"):
            continue
        try:
            hb = Heartbeat.from_json(storage.get_bytes(key))
        except FileNotFoundError:
            continue
        except ValueError as e:
            log.warning("ignoring malformed heartbeat %s: %s", storage.uri_for(key), e)
            continue
        if hb.attempt == attempt:
            beats.append(hb)
            if hb.stack_dump:
                dumps[hb.rank] = storage.uri_for(hb.stack_dump)
    return beats, dumps


def write_fence(spec: JobSpec, phase: str, attempt: int, pod: str, when: str, *,
                credentials: Credentials, resume_from: str | None = None, uid: str = "", job: str = "",
                clear_control: bool = False, writer: LeaderTerm = LeaderTerm(),
                members: Sequence[str] = (), store: str = "", store_member: int = 0) -> str:
    """Write ``<phase prefix>/fence.json`` naming ``attempt`` of the job ``uid`` (``job``:
    namespace/name): from now on every other attempt's commit and retention are refused
    (``phoenix_trainer.core.handshake.check_fence``); a standby of that attempt starts, from
    ``resume_from``. ``clear_control``: a new attempt starts, so requests left for an older
    one (or a deleted job's) go. ``writer``: the leader's term (refused over a newer one's,
    ``StaleLeaderError``). ``members``/``store``/``store_member``: an in-place gang's pods
    and TCPStore (``handshake.Fence``). Returns where it was written."""
    storage = _storage(spec.checkpoint.phase_uri(phase), credentials)
    return handshake.write_fence(storage, Fence(attempt, pod, when, resume_from or "", uid=uid,
                                                job=job, writer=writer, members=tuple(members),
                                                store=store, store_member=store_member),
                                 clear_control=clear_control)


def write_control(spec: JobSpec, phase: str, control: Control, *,
                  credentials: Credentials) -> str:
    """Write ``<phase prefix>/control.json``: requests to the phase's running attempt."""
    storage = _storage(spec.checkpoint.phase_uri(phase), credentials)
    return handshake.write_control(storage, control)


def _time(value: str | None):
    try:
        return parse_ts(value)
    except (TypeError, ValueError):
        return None


# --- the phase's history (phoenix_operator.history: the records; apply's last step: when) ---

def _phase_storage(spec: JobSpec, phase: str, credentials: Credentials):
    return _storage(spec.checkpoint.phase_uri(phase), credentials)


def read_history(spec: JobSpec, phase: str, *, credentials: Credentials) -> list[dict]:
    """The phase's history records, oldest first ([] when it has none yet)."""
    storage = _phase_storage(spec, phase, credentials)
    try:
        data = storage.get_bytes(HISTORY_KEY)
    except FileNotFoundError:
        return []
    return history.decode(data, storage.uri_for(HISTORY_KEY))


def append_history(spec: JobSpec, phase: str, records: list[dict], *, credentials: Credentials,
                   writer: LeaderTerm = LeaderTerm()) -> list[dict]:
    """Append the records whose key is new to ``<phase prefix>/history.jsonl``; returns the
    phase's whole history after the write. S3 cannot append: a read-modify-write of one
    object, safe because only the leader writes it (``apply.Applier.write`` checks the
    Lease right before) and a deposed leader's write is refused once a newer term has
    written (``StaleLeaderError``, as for ``fence.json``). Records already there are kept
    byte for byte: nothing is ever rewritten."""
    storage = _phase_storage(spec, phase, credentials)
    try:
        existing = history.decode(storage.get_bytes(HISTORY_KEY), storage.uri_for(HISTORY_KEY))
    except FileNotFoundError:
        existing = []
    newest = history.newest_term(existing)
    if writer and newest and LeaderTerm.from_dict(newest).lease_uid == writer.lease_uid \
            and int(newest.get("term") or 0) > writer.term:
        raise StaleLeaderError(f"{storage.uri_for(HISTORY_KEY)} was written in leader term "
                               f"{newest.get('term')} by {newest.get('leader')}; this is term {writer.term}")
    merged, added = history.merge(existing, records)
    if added:
        storage.put_bytes(HISTORY_KEY, history.encode(merged))
    return merged


def read_attempt_log(spec: JobSpec, phase: str, attempt: int, *,
                     credentials: Credentials) -> list[dict]:
    """The trainer's ``metrics/attempt-N.jsonl`` of one attempt ([] if it wrote none)."""
    storage = _phase_storage(spec, phase, credentials)
    try:
        data = storage.get_bytes(metrics_key(attempt))
    except FileNotFoundError:
        return []
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a log being rewritten
    return out


MAX_LOGS_READ = 200  # attempt logs one report or timeline reads (the newest attempts')


def read_job_history(spec: JobSpec, *, credentials: Credentials, logs_for: str = "open"
                     ) -> tuple[list[dict], dict[str, dict[int, list[dict]]]]:
    """Every phase's history records and attempt logs, as ``phoenixctl report``/``timeline``
    and the lab's demo read them. ``logs_for``: "open" reads the logs of attempts the
    history has not seen end (their training start), "all" every attempt's (checkpoints for
    the timeline), the newest ``MAX_LOGS_READ``."""
    records: list[dict] = []
    logs: dict[str, dict[int, list[dict]]] = {}
    for phase in spec.phases:
        mine = read_history(spec, phase.name, credentials=credentials)
        records += mine
        kinds = history.attempts(mine, phase.name)
        wanted = [a for a, k in kinds.items() if logs_for == "all" or "end" not in k]
        for attempt in wanted[-MAX_LOGS_READ:]:
            events = read_attempt_log(spec, phase.name, attempt, credentials=credentials)
            if events:
                logs.setdefault(phase.name, {})[attempt] = events
    return records, logs
