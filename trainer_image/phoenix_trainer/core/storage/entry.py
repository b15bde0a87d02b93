"""What a stored object is (``FileEntry``: size, sha256 and the store's own checksum) and the
two helpers both backends use to produce one: a running digest and key joining.

Standard library only: no torch, no boto3, no import from the rest of ``phoenix_trainer``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass
class FileEntry:
    size: int
    sha256: str  # hex, of the whole file
    # What the object store itself recorded for the object at upload (S3 ChecksumSHA256:
    # base64, "-<parts>" for a multipart upload's composite), if it records one. Lets a
    # reader check the stored object is the one uploaded with one HEAD, no download.
    stored_checksum: str | None = None


class Digest:
    """Size and sha256 of a stream, as it goes by."""

    def __init__(self) -> None:
        self.h, self.n = hashlib.sha256(), 0

    def update(self, mv: memoryview) -> None:
        self.h.update(mv)
        self.n += len(mv)


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))
