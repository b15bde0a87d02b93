"""The operator <-> trainer contract: environment variable names and the termination message.

This module is imported by the operator image as well as the trainer, so it must never
import torch (or anything heavier than the standard library). Change a name here and both
sides change together; nobody else types these strings.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Mapping

# --- environment given to the trainer pod ------------------------------------------------
ENV_JOB_NAME = "PHOENIX_JOB_NAME"
ENV_JOB_NAMESPACE = "PHOENIX_JOB_NAMESPACE"
ENV_PHASE = "PHOENIX_PHASE"
ENV_ATTEMPT = "PHOENIX_ATTEMPT"  # int, 0-based or 1-based as the operator counts; opaque here
ENV_JOB_UID = "PHOENIX_JOB_UID"  # the PhoenixJob's metadata.uid: whose fence and control count
ENV_CHECKPOINT_URI = "PHOENIX_CHECKPOINT_URI"  # this phase's prefix, s3://bucket/prefix/<phase>
ENV_RESUME_FROM = "PHOENIX_RESUME_FROM"  # full step-dir URI the operator validated
ENV_INIT_FROM = "PHOENIX_INIT_FROM"  # previous phase's final checkpoint (weights only)
ENV_CHECKPOINT_KEEP = "PHOENIX_CHECKPOINT_KEEP"
ENV_CHECKPOINT_INTERVAL_STEPS = "PHOENIX_CHECKPOINT_INTERVAL_STEPS"
ENV_CHECKPOINT_INTERVAL_SECONDS = "PHOENIX_CHECKPOINT_INTERVAL_SECONDS"
ENV_GRACE_SECONDS = "PHOENIX_GRACE_SECONDS"
ENV_TERMINATION_LOG = "PHOENIX_TERMINATION_LOG"
ENV_FORCE_RESUME = "PHOENIX_FORCE_RESUME"
ENV_ROLE = "PHOENIX_ROLE"  # "active" (default), "standby" or "spare": wait, warm, for the fence
ENV_CONTROL_POLL_SECONDS = "PHOENIX_CONTROL_POLL_SECONDS"  # how often control/fence are read
ENV_POD_NAME = "PHOENIX_POD_NAME"  # the pod's name (downward API), named in heartbeats
ENV_STATUS_PORT = "PHOENIX_STATUS_PORT"  # serve GET /ready here (the pod's readiness probe)
ROLE_ACTIVE, ROLE_STANDBY = "active", "standby"
# An in-place gang's spare member (recovery.standby with gangRestart: Member): started without
# a member index, it waits at the gang's start (distributed.init_from_env) until a fence names
# its pod in ``members``, and takes that member's place (rejoin.take_place).
ROLE_SPARE = "spare"
# A gang whose lost members are replaced in place (recovery.gangRestart: Member): torchrun
# runs standalone in each pod and the global process group is Phoenix's
# (phoenix_trainer.distributed.init_from_env), rebuilt around the survivors.
ENV_GANG_RESTART = "PHOENIX_GANG_RESTART"  # "Member" (absent: Whole)
ENV_GANG_MEMBERS = "PHOENIX_GANG_MEMBERS"  # the gang's pods (replicas)
ENV_GANG_MEMBER = "PHOENIX_GANG_MEMBER"  # this pod's index; global rank = member*nproc + local
ENV_GANG_STORE = "PHOENIX_GANG_STORE"  # host:port of this attempt's c10d TCPStore
ENV_GANG_STORE_MEMBER = "PHOENIX_GANG_STORE_MEMBER"  # whose local rank 0 hosts it
ENV_PEER_DIR = "PHOENIX_PEER_DIR"  # memory-backed; the survivors' state outlives a re-exec
GANG_RESTART_MEMBER = "Member"
PEER_DIR = "/var/run/phoenix/peer"
DEFAULT_CONTROL_POLL_SECONDS = 0.25

# Set by the trainer image, not the operator: where checkpoint files are staged before upload
# (only DCP's sharded files now; other shards stream to storage), and how much of it they may
# take (MB; unset = the file system's free space) before a save is refused with a reason.
ENV_SPOOL_DIR = "PHOENIX_SPOOL_DIR"
ENV_SPOOL_LIMIT_MB = "PHOENIX_SPOOL_LIMIT_MB"
ENV_CHECKPOINT_NICE = "PHOENIX_CHECKPOINT_NICE"  # the upload thread's nice increment (0: none)
ENV_SNAPSHOT_THREADS = "PHOENIX_SNAPSHOT_THREADS"  # threads copying a CPU snapshot (1: the loop's own)
ENV_S3_SIGN_PAYLOAD = "PHOENIX_S3_SIGN_PAYLOAD"  # "1": SigV4-sign every request body too
ENV_UPLOAD_PROCESS = "PHOENIX_UPLOAD_PROCESS"  # "0": S3 uploads stay in the trainer process
# The trainer container's ephemeral-storage limit in MB (10^6 bytes), set by the operator
# through the downward API where the container declares one: the spool's default limit.
ENV_EPHEMERAL_STORAGE_MB = "PHOENIX_EPHEMERAL_STORAGE_MB"

# Set by the trainer image (or a user), read by restores (core/storage/parallel.py): shards
# are read as ranges of PART_MB, CONCURRENCY ranges in flight over all shards, and shards
# downloaded ahead of the one being loaded take at most MEMORY_MB (one shard always fits).
ENV_RESTORE_PART_MB = "PHOENIX_RESTORE_PART_MB"
ENV_RESTORE_CONCURRENCY = "PHOENIX_RESTORE_CONCURRENCY"
ENV_RESTORE_MEMORY_MB = "PHOENIX_RESTORE_MEMORY_MB"

# S3: boto3 reads these natively; listed so the operator sets exactly these.
ENV_AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
ENV_AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_AWS_DEFAULT_REGION = "AWS_DEFAULT_REGION"
ENV_AWS_SESSION_TOKEN = "AWS_SESSION_TOKEN"  # optional in the Secret: temporary credentials
ENV_AWS_CA_BUNDLE = "AWS_CA_BUNDLE"  # a private CA's bundle (spec.checkpoint.caBundle)

# How the S3 client addresses a bucket: spec.checkpoint.addressingStyle as the job wrote it
# (auto | path | virtual); both sides resolve it with ``s3_addressing_style``.
ENV_S3_ADDRESSING_STYLE = "PHOENIX_S3_ADDRESSING_STYLE"
ADDRESSING_AUTO, ADDRESSING_PATH, ADDRESSING_VIRTUAL = "auto", "path", "virtual"
ADDRESSING_STYLES = (ADDRESSING_AUTO, ADDRESSING_PATH, ADDRESSING_VIRTUAL)

ALL_ENV = (
    ENV_JOB_NAME, ENV_JOB_NAMESPACE, ENV_PHASE, ENV_ATTEMPT, ENV_JOB_UID, ENV_CHECKPOINT_URI,
    ENV_RESUME_FROM, ENV_INIT_FROM, ENV_CHECKPOINT_KEEP, ENV_CHECKPOINT_INTERVAL_STEPS,
    ENV_CHECKPOINT_INTERVAL_SECONDS, ENV_GRACE_SECONDS, ENV_TERMINATION_LOG, ENV_FORCE_RESUME,
    ENV_ROLE, ENV_CONTROL_POLL_SECONDS, ENV_STATUS_PORT, ENV_S3_ADDRESSING_STYLE,
)

# --- defaults ----------------------------------------------------------------------------
DEFAULT_CHECKPOINT_KEEP = 3
MIN_CHECKPOINT_KEEP = 2
DEFAULT_GRACE_SECONDS = 30.0
DEFAULT_TERMINATION_LOG = "/dev/termination-log"

# --- exit codes --------------------------------------------------------------------------
EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a kubelet reports for a SIGTERMed container

# --- termination message -----------------------------------------------------------------
REASON_PREEMPTED = "preempted"
REASON_COMPLETED = "completed"
REASON_FAILED = "failed"
REASONS = (REASON_PREEMPTED, REASON_COMPLETED, REASON_FAILED)

# Kubernetes truncates termination messages at 4096 bytes; keep ours well below that.
MAX_TERMINATION_MESSAGE_BYTES = 4096
MAX_REASON_CHARS = 1000  # resumeExactReason's share of it


@dataclass
class TerminationMessage:
    """What the trainer leaves in the termination log for the operator to record.

    JSON keys are exactly: reason, step, checkpoint, emergencySaveCompleted, message,
    resumeExact (true/false, or null when the trainer did not get far enough to know) and
    resumeExactReason (why a resume of this run is not bit-exact; "" when it is).
    """

    reason: str
    step: int | None = None
    checkpoint: str | None = None  # URI of the newest valid checkpoint the trainer wrote/knows
    emergencySaveCompleted: bool = False
    message: str = ""
    resumeExact: bool | None = None
    resumeExactReason: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"termination reason {self.reason!r} is not one of {REASONS}")

    def to_json(self) -> str:
        data = asdict(self)
        if len(data["resumeExactReason"]) > MAX_REASON_CHARS:
            data["resumeExactReason"] = data["resumeExactReason"][:MAX_REASON_CHARS] + "..."
        text = json.dumps(data, sort_keys=True)
        if len(text.encode()) > MAX_TERMINATION_MESSAGE_BYTES:
            # The message is the free-form field; shorten it rather than lose the rest.
            overflow = len(text.encode()) - MAX_TERMINATION_MESSAGE_BYTES + 16
            data["message"] = data["message"][: max(0, len(data["message"]) - overflow)] + "..."
            text = json.dumps(data, sort_keys=True)
        return text

    @classmethod
    def from_json(cls, text: str) -> "TerminationMessage":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("termination message is not a JSON object")
        step = data.get("step")
        return cls(
            reason=str(data.get("reason", "")),
            step=int(step) if step is not None else None,
            checkpoint=data.get("checkpoint"),
            emergencySaveCompleted=bool(data.get("emergencySaveCompleted", False)),
            message=str(data.get("message", "")),
            resumeExact=bool(data["resumeExact"]) if data.get("resumeExact") is not None else None,
            resumeExactReason=str(data.get("resumeExactReason") or ""),
        )

    def write(self, path: str | None = None) -> bool:
        """Write to ``path`` (default: $PHOENIX_TERMINATION_LOG or /dev/termination-log).

        Returns False instead of raising: a missing termination log must never turn a clean
        preemption into a crash.
        """
        path = path or termination_log_path()
        try:
            with open(path, "w") as f:
                f.write(self.to_json())
            return True
        except OSError:
            return False


def s3_addressing_style(requested: str | None, endpoint_url: str | None) -> str:
    """``path`` or ``virtual``: how an S3 client addresses a bucket, decided in this one place
    for the operator's client and the trainer's, so both reach the bucket the same way.

    ``path`` and ``virtual`` are taken as asked. ``auto`` (or nothing) is path-style when a
    custom endpoint is set - S3-compatible servers (MinIO, versitygw, Ceph) serve it and
    seldom have a DNS name per bucket - and virtual-hosted when not: AWS, which is retiring
    path-style (botocore still falls back to path-style for a bucket name that cannot be a
    host name). The same choice botocore makes for ``auto``, written down so it is ours."""
    style = (requested or ADDRESSING_AUTO).strip().lower()
    if style not in ADDRESSING_STYLES:
        raise ValueError(f"S3 addressing style {requested!r}: expected one of "
                         f"{', '.join(ADDRESSING_STYLES)}")
    if style != ADDRESSING_AUTO:
        return style
    return ADDRESSING_PATH if endpoint_url else ADDRESSING_VIRTUAL


def addressing_style_from_env(environ: Mapping[str, str] | None = None) -> str:
    """``PHOENIX_S3_ADDRESSING_STYLE`` (unset: ``auto``), validated; the one parser of it."""
    environ = os.environ if environ is None else environ
    raw = (environ.get(ENV_S3_ADDRESSING_STYLE) or ADDRESSING_AUTO).strip().lower()
    if raw not in ADDRESSING_STYLES:
        raise ValueError(f"{ENV_S3_ADDRESSING_STYLE}={raw!r}: expected one of "
                         f"{', '.join(ADDRESSING_STYLES)} (spec.checkpoint.addressingStyle)")
    return raw


def sign_payload_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """``PHOENIX_S3_SIGN_PAYLOAD``: whether SigV4 signs request bodies too; by default not.

    botocore signs a body's SHA-256 on every plain-HTTP request, one more pass over every
    byte uploaded, on both ends (the server checks it), besides the two the stream writer
    makes. It adds nothing there: every object the trainer writes carries its SHA-256 (or a
    CRC that botocore adds) in a header, the headers are signed, and the server refuses a
    body that does not match (a multipart completion's list of parts is checked against the
    checksum the writer composed, which the store's reply names). That is how
    botocore already uploads over HTTPS; this makes plain-HTTP endpoints (a MinIO in the
    cluster) do the same. Set, it restores the signed body for a server that insists on it."""
    environ = os.environ if environ is None else environ
    return _bool(environ, ENV_S3_SIGN_PAYLOAD)


def upload_process_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """``PHOENIX_UPLOAD_PROCESS``: whether streamed S3 uploads run in a helper process
    (``core/storage/upload_proc.py``); on unless set to 0/false/no/off."""
    environ = os.environ if environ is None else environ
    return environ.get(ENV_UPLOAD_PROCESS, "").strip().lower() not in ("0", "false", "no", "off")


def termination_log_path(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get(ENV_TERMINATION_LOG) or DEFAULT_TERMINATION_LOG


def _number(environ: Mapping[str, str], name: str, default, kind, hint: str):
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not {hint}") from e


def _int(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    return _number(environ, name, default, int, "an integer; set it to a whole number")


def _float(environ: Mapping[str, str], name: str, default: float | None) -> float | None:
    return _number(environ, name, default, float, "a number; set it to seconds, e.g. 30")


def _bool(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _role(environ: Mapping[str, str]) -> str:
    role = (environ.get(ENV_ROLE) or ROLE_ACTIVE).strip().lower()
    if role not in (ROLE_ACTIVE, ROLE_STANDBY, ROLE_SPARE):
        raise ValueError(f"{ENV_ROLE}={role!r}: expected {ROLE_ACTIVE!r}, {ROLE_STANDBY!r} or"
                         f" {ROLE_SPARE!r}")
    return role


@dataclass(frozen=True)
class TrainerEnv:
    """The contract parsed and validated once, at the edge."""

    job_name: str = ""
    job_namespace: str = ""
    phase: str = "train"
    attempt: int | None = None  # None: not run by the operator; the trainer picks the next free
    job_uid: str = ""  # "": not run by the operator (or by one from before the uid)
    checkpoint_uri: str | None = None
    resume_from: str | None = None
    init_from: str | None = None
    checkpoint_keep: int = DEFAULT_CHECKPOINT_KEEP
    checkpoint_interval_steps: int | None = None
    checkpoint_interval_seconds: float | None = None
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    termination_log: str = DEFAULT_TERMINATION_LOG
    force_resume: bool = False
    role: str = ROLE_ACTIVE
    control_poll_seconds: float = DEFAULT_CONTROL_POLL_SECONDS
    status_port: int | None = None
    s3_addressing_style: str = ADDRESSING_AUTO  # as asked; resolved by s3_addressing_style
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TrainerEnv":
        environ = os.environ if environ is None else environ
        keep = _int(environ, ENV_CHECKPOINT_KEEP, DEFAULT_CHECKPOINT_KEEP)
        if keep is not None and keep < MIN_CHECKPOINT_KEEP:
            raise ValueError(
                f"{ENV_CHECKPOINT_KEEP}={keep} is below {MIN_CHECKPOINT_KEEP}; keeping fewer than"
                f" two checkpoints leaves nothing to fall back to. Set it to 2 or more.")
        interval_steps = _int(environ, ENV_CHECKPOINT_INTERVAL_STEPS, None)
        if interval_steps is not None and interval_steps <= 0:
            interval_steps = None
        interval_seconds = _float(environ, ENV_CHECKPOINT_INTERVAL_SECONDS, None)
        if interval_seconds is not None and interval_seconds <= 0:
            interval_seconds = None
        return cls(
            job_name=environ.get(ENV_JOB_NAME, ""),
            job_namespace=environ.get(ENV_JOB_NAMESPACE, ""),
            phase=environ.get(ENV_PHASE) or "train",
            attempt=_int(environ, ENV_ATTEMPT, None),
            job_uid=environ.get(ENV_JOB_UID, ""),
            checkpoint_uri=environ.get(ENV_CHECKPOINT_URI) or None,
            resume_from=environ.get(ENV_RESUME_FROM) or None,
            init_from=environ.get(ENV_INIT_FROM) or None,
            checkpoint_keep=keep,
            checkpoint_interval_steps=interval_steps,
            checkpoint_interval_seconds=interval_seconds,
            grace_seconds=_float(environ, ENV_GRACE_SECONDS, DEFAULT_GRACE_SECONDS),
            termination_log=termination_log_path(environ),
            force_resume=_bool(environ, ENV_FORCE_RESUME),
            role=_role(environ),
            control_poll_seconds=max(0.05, _float(environ, ENV_CONTROL_POLL_SECONDS,
                                                  DEFAULT_CONTROL_POLL_SECONDS)),
            status_port=_int(environ, ENV_STATUS_PORT, None),
            s3_addressing_style=addressing_style_from_env(environ),
        )

    @property
    def standby(self) -> bool:
        return self.role == ROLE_STANDBY

    @property
    def log_context(self) -> str:
        """``namespace/name/phase`` for log lines (never credentials)."""
        ns = self.job_namespace or "-"
        name = self.job_name or "local"
        return f"{ns}/{name}/{self.phase}"


def whole_number_setting(environ: Mapping[str, str], name: str, default: int, low: int,
                         high: int) -> int:
    """The trainer's integer setting ``name`` from ``environ``, ``default`` where unset or
    blank; anything but a whole number from ``low`` to ``high`` is refused with a
    ``CheckpointError`` that names it."""
    from .errors import CheckpointError

    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise CheckpointError(f"{name}={raw!r} is not a whole number") from None
    if not low <= n <= high:
        raise CheckpointError(f"{name}={raw!r} must be between {low} and {high}")
    return n


# How much lower than the training loop the uploads run (nice increment, 0..19).
DEFAULT_CHECKPOINT_NICE = 10


def checkpoint_nice(environ: Mapping[str, str] | None = None) -> int:
    """``PHOENIX_CHECKPOINT_NICE``: how many nice levels the upload thread (and the upload
    process, ``core/storage/upload_proc.py``) drop below the thread that made the
    checkpointer (default 10, 0 keeps them level)."""
    return whole_number_setting(os.environ if environ is None else environ,
                                ENV_CHECKPOINT_NICE, DEFAULT_CHECKPOINT_NICE, 0, 19)


def lower_thread_priority(increment: int) -> bool:
    """Drop the calling thread's CPU priority by ``increment`` nice levels; False where the
    system refused (the caller runs on at its priority: not worth failing a save for).

    Linux keeps a nice value per thread and a thread starts with its creator's, so the
    part-upload threads an upload starts inherit it (and a single-threaded process lowers
    itself whole). When the cores are short (the loop's Python and data loading, DataLoader
    workers, an upload's hashing and sockets), the scheduler then runs the training first
    and the upload in what is left; when they are not, a niced thread runs exactly as fast.
    Raising nice needs no privilege."""
    if increment <= 0:
        return True
    import threading

    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        return True
    except (AttributeError, OSError):  # not Linux, or a sandbox that refuses it
        return False
