"""What a stored object is (``FileEntry``: size, sha256 and the store's own checksum) and the
helpers both backends use to produce one: a running digest, S3's composite checksum and key
joining.

Standard library only: no torch, no boto3, no import from the rest of ``phoenix_trainer``.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field


@dataclass
class FileEntry:
    size: int
    sha256: str  # hex, of the whole file
    # What the object store itself recorded for the object at upload (S3 ChecksumSHA256:
    # base64, "-<parts>" for a multipart upload's composite), if it records one. Lets a
    # reader check the stored object is the one uploaded with one HEAD, no download.
    stored_checksum: str | None = None
    # The part size of the multipart upload behind ``stored_checksum`` (every part but the
    # last this big): what lets a restore recompute that composite part by part, in parallel.
    part_size: int | None = None
    # Set by a stream writer when the store's reply to the upload itself (PutObject,
    # CompleteMultipartUpload) named ``stored_checksum``: the writer then needs no HEAD to
    # learn what the store recorded. Never written to a manifest.
    confirmed: bool = field(default=False, compare=False, repr=False)

    def restore_check(self) -> tuple[int | None, str]:
        """How a restore checks the bytes it read: ``(part_size, stored_checksum)`` where the
        object is a multipart upload whose composite checksum the manifest holds and whose
        part size is known and agrees with the composite's part count (each part is then
        hashed on its own, on whichever thread read it, and the composite compared);
        otherwise ``(None, sha256)``: the whole object hashed in byte order.

        Both are SHA-256 based and pin the exact bytes the writer hashed (it computed the
        composite from the parts it sent and checked the store recorded the same): a
        different object of the same size passes only through a SHA-256 collision. An
        entry whose part size does not fit its composite falls back to the whole sha256."""
        c = self.stored_checksum
        if self.part_size and self.part_size > 0 and c and "-" in c and self.size > 0:
            parts = -(-self.size // self.part_size)
            if c.rsplit("-", 1)[1] == str(parts):
                return self.part_size, c
        return None, self.sha256


class Digest:
    """Size and sha256 of a stream, as it goes by."""

    def __init__(self) -> None:
        self.h, self.n = hashlib.sha256(), 0

    def update(self, mv: memoryview) -> None:
        self.h.update(mv)
        self.n += len(mv)


def composite_sha256(part_digests: list[bytes]) -> str:
    """The checksum S3 records for a multipart upload with SHA256 (COMPOSITE): the sha256 of
    the parts' raw sha256 digests, base64, then ``-<parts>``."""
    whole = hashlib.sha256(b"".join(part_digests)).digest()
    return f"{base64.b64encode(whole).decode()}-{len(part_digests)}"


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))
