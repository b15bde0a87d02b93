"""Checkpoint layout: step directories, the manifest, and validation. Shared with the operator.

    <prefix>/step-0000000120/model.pt, optimizer.pt, ..., manifest.json

``manifest.json`` is written LAST and lists every file's size and sha256. A checkpoint
exists iff its manifest exists and validates; the latest checkpoint is the highest step with
a valid manifest. Per-attempt metrics live in ``<prefix>/metrics/attempt-<n>.jsonl``. The
prefix's ``fence.json`` and ``control.json`` belong to ``handshake.py``.

This module must never import torch (the operator image does not ship it) and never perform
writes: it only reads storage through the small ``Storage`` protocol from ``storage``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import CorruptCheckpointError
from .storage import FileEntry, Storage

log = logging.getLogger("phoenix.layout")

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "phoenix-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
METRICS_DIR = "metrics"
# The operator's record of the phase's attempts (phoenix_operator.history): JSON lines,
# appended by the operator's leader only; the trainer never writes or deletes it.
HISTORY_KEY = "history.jsonl"
STEP_DIR_RE = re.compile(r"^step-(\d{10})$")


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return "step-%010d" % step


def parse_step_dir(name: str) -> int | None:
    """``step-0000000120`` -> 120; anything else -> None."""
    m = STEP_DIR_RE.match(name.rstrip("/"))
    return int(m.group(1)) if m else None


def metrics_key(attempt: int) -> str:
    return f"{METRICS_DIR}/attempt-{attempt}.jsonl"


def split_checkpoint_uri(uri: str) -> tuple[str, int | None]:
    """Split ``s3://b/p/train/step-0000000120`` into (``s3://b/p/train``, 120).

    A URI that does not end in a step directory comes back whole, with step None.
    """
    trimmed = uri.rstrip("/")
    head, _, last = trimmed.rpartition("/")
    step = parse_step_dir(last)
    if step is None or not head:
        return trimmed, None
    return head, step


@dataclass
class Manifest:
    step: int
    epoch: int
    phase: str
    time: str  # ISO 8601, UTC
    config_fingerprint: str
    files: dict[str, FileEntry]
    format_version: int = FORMAT_VERSION
    run_id: str = ""
    attempt: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT_NAME,
            "formatVersion": self.format_version,
            "step": self.step,
            "epoch": self.epoch,
            "phase": self.phase,
            "time": self.time,
            "configFingerprint": self.config_fingerprint,
            "runId": self.run_id,
            "attempt": self.attempt,
            "files": {n: _file_json(f) for n, f in sorted(self.files.items())},
            "extra": self.extra,
        }, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        """Parse and structurally validate; raises CorruptCheckpointError with the reason."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"manifest is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise CorruptCheckpointError("manifest is not a JSON object")
        if data.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"manifest format {data.get('format')!r} is not {FORMAT_NAME!r}")
        version = data.get("formatVersion")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise CorruptCheckpointError(
                f"manifest formatVersion {version!r} is not supported (supported:"
                f" {SUPPORTED_FORMAT_VERSIONS}); upgrade the reader")
        try:
            files = {
                str(name): FileEntry(size=int(e["size"]), sha256=str(e["sha256"]),
                                     stored_checksum=e.get("storedChecksum"),
                                     part_size=int(e["partSize"]) if e.get("partSize") else None)
                for name, e in data["files"].items()
            }
            manifest = cls(
                step=int(data["step"]), epoch=int(data["epoch"]), phase=str(data["phase"]),
                time=str(data["time"]), config_fingerprint=str(data["configFingerprint"]),
                files=files, format_version=int(version), run_id=str(data.get("runId", "")),
                attempt=data.get("attempt"), extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptCheckpointError(f"manifest is missing or has a malformed field ({e!r})") from e
        if not files:
            raise CorruptCheckpointError("manifest lists no files")
        for name, entry in files.items():
            if "/" in name or name in ("", ".", "..", MANIFEST_NAME):
                raise CorruptCheckpointError(f"manifest lists an illegal file name {name!r}")
            if entry.size < 0 or not re.fullmatch(r"[0-9a-f]{64}", entry.sha256):
                raise CorruptCheckpointError(f"manifest entry for {name!r} has a bad size or sha256")
        return manifest


def _file_json(f: FileEntry) -> dict[str, Any]:
    d: dict[str, Any] = {"size": f.size, "sha256": f.sha256}
    if f.stored_checksum:
        d["storedChecksum"] = f.stored_checksum
    if f.part_size:
        d["partSize"] = f.part_size
    return d


@dataclass
class CheckpointInfo:
    step: int
    uri: str
    manifest: Manifest | None
    valid: bool
    reason: str = ""

    @property
    def epoch(self) -> int | None:
        return self.manifest.epoch if self.manifest else None


def sha256_stream(reader, chunk: int = 8 << 20) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while True:
        block = reader.read(chunk)
        if not block:
            break
        n += len(block)
        h.update(block)
    return n, h.hexdigest()


def verify_checkpoint(storage: Storage, step: int, deep: bool = True) -> CheckpointInfo:
    """Validate one step directory. deep=False: manifest + sizes; deep=True: also content.

    Content without a download where the store keeps checksums: a shard whose manifest entry
    has the ``stored_checksum`` the store reported at upload is checked with one HEAD (size
    and checksum; S3 ChecksumSHA256). Others (local files, stores without checksums,
    manifests written before) are read and sha256-hashed, as before."""
    d = step_dir_name(step)
    uri = storage.uri_for(d)
    try:
        raw = storage.get_bytes(f"{d}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return CheckpointInfo(step, uri, None, False, "manifest.json is missing (incomplete save)")
    try:
        manifest = Manifest.from_json(raw)
    except CorruptCheckpointError as e:
        return CheckpointInfo(step, uri, None, False, f"corrupt manifest: {e}")
    if manifest.step != step:
        return CheckpointInfo(step, uri, manifest, False,
                              f"manifest says step {manifest.step} but lives in {d}")
    unchecked = []
    for name, entry in sorted(manifest.files.items()):
        size, stored = storage.stat(f"{d}/{name}")
        if size is None:
            return CheckpointInfo(step, uri, manifest, False, f"shard {name} is missing")
        if size != entry.size:
            return CheckpointInfo(step, uri, manifest, False,
                                  f"shard {name} has {size} bytes, manifest says {entry.size} (truncated?)")
        if entry.stored_checksum and stored:
            if stored != entry.stored_checksum:
                return CheckpointInfo(step, uri, manifest, False,
                                      f"shard {name} is not the object that was uploaded (stored"
                                      f" checksum {stored}, manifest says {entry.stored_checksum})")
        else:
            unchecked.append((name, entry))
    if deep:
        for name, entry in unchecked:
            try:
                with storage.open_read(f"{d}/{name}") as reader:
                    _, digest = sha256_stream(reader)
            except FileNotFoundError:
                return CheckpointInfo(step, uri, manifest, False, f"shard {name} is missing")
            if digest != entry.sha256:
                return CheckpointInfo(step, uri, manifest, False,
                                      f"shard {name} sha256 mismatch (stored data is corrupt)")
    return CheckpointInfo(step, uri, manifest, True, "ok")


def checkpoint_steps(storage: Storage) -> list[int]:
    steps = {parse_step_dir(name) for name in storage.list_dirs("")}
    return sorted(s for s in steps if s is not None)


def list_checkpoints(storage: Storage, deep: bool = False) -> list[CheckpointInfo]:
    """Every step directory under the prefix, validated, sorted by step ascending."""
    return [verify_checkpoint(storage, step, deep=deep) for step in checkpoint_steps(storage)]


def latest_valid_checkpoint(storage: Storage, deep: bool = True,
                            exclude_steps: Iterable[int] = (),
                            below_step: int | None = None) -> CheckpointInfo | None:
    """The highest step whose manifest validates; newer invalid ones are logged and skipped."""
    excluded = set(exclude_steps)
    for step in reversed(checkpoint_steps(storage)):
        if step in excluded or (below_step is not None and step >= below_step):
            continue
        info = verify_checkpoint(storage, step, deep=deep)
        if info.valid:
            return info
        log.warning("skipping checkpoint %s: %s; falling back to an older one", info.uri, info.reason)
    return None


def config_fingerprint(config: Any) -> str:
    """Stable short hash of a JSON-able training config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
