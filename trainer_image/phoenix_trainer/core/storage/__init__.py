"""Checkpoint storage behind a small Protocol, and the one door to it: ``open_storage``.

Keys are '/'-separated paths relative to the storage's root prefix. Both backends
(``file.LocalStorage``, ``s3.S3Storage``) make a write visible only when complete, which is
what lets the manifest-last rule work.

``open_write`` streams an object in (a checkpoint shard serialized straight from memory):
no local copy, bounded memory, and nothing visible or left behind unless ``commit`` is
reached (S3: a multipart upload aborted on any error; local: a temp file removed).

``read_into`` reads one range straight into a caller's buffer; ``parallel.read_parallel``
builds restores on it: many ranges and objects in flight, bounded, hashed as they arrive.

Every caller that turns a URI into storage (trainer, operator, CLI) goes through
``open_storage``; nobody else parses checkpoint URIs. This package must never import torch
(the operator imports it) nor anything from ``phoenix_trainer`` outside ``core``, and never
logs credentials.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import IO, Any, Callable, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from .entry import FileEntry
from .file import LocalStorage
from .parallel import Fetched, ReadConfig, read_parallel
from .s3 import S3Storage

__all__ = ["Storage", "ObjectWriter", "FileEntry", "Credentials", "open_storage", "ReadConfig",
           "Fetched", "read_parallel"]


class ObjectWriter(Protocol):
    """An object being streamed into storage (``Storage.open_write``): ``write`` as often as
    needed, then exactly one of ``commit`` (the object appears, whole) or ``abort``."""

    def write(self, data: Any) -> int: ...  # bytes-like; copied before it returns
    def flush(self) -> None: ...
    # size and sha256 of everything written, plus the checksum the store recorded (if any)
    def commit(self) -> FileEntry: ...
    def abort(self) -> None: ...  # idempotent; leaves nothing behind, never raises


@runtime_checkable
class Storage(Protocol):
    """What checkpointing needs from a place to keep bytes."""

    uri: str  # the root, e.g. s3://bucket/prefix/train or file:///ckpt/train

    def uri_for(self, key: str) -> str: ...
    def child(self, sub: str) -> "Storage": ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: str | os.PathLike) -> None: ...
    # Stream an object in; ``size_hint`` (expected bytes, may be off) lets S3 pick part sizes.
    def open_write(self, key: str, size_hint: int | None = None) -> ObjectWriter: ...
    # Ready what later ``open_write`` calls on other threads use (S3: start the upload
    # process); called by the thread that forks the process's workers. Idempotent.
    def prepare_uploads(self) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...  # FileNotFoundError if absent
    # The object and the sha256 hex digest of its bytes (S3: hashed as it arrives)
    def get_bytes_sha256(self, key: str) -> tuple[bytes, str]: ...
    # One range: len(view) bytes at offset into view (a writable buffer), fewer only past the
    # object's end; returns the object's total size. FileNotFoundError if absent. The
    # parallel reader (``parallel.read_parallel``) is built on it.
    def read_into(self, key: str, offset: int, view: Any) -> int: ...
    def get_file(self, key: str, path: str | os.PathLike) -> None: ...
    def open_read(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...
    def size(self, key: str) -> int | None: ...  # None if absent
    # (size, checksum the store recorded at upload); (None, None) if absent, checksum None
    # where the store keeps none. One metadata request, never a download.
    def stat(self, key: str) -> tuple[int | None, str | None]: ...
    def list_dirs(self, prefix: str) -> list[str]: ...  # immediate child "directories"
    def list_keys(self, prefix: str) -> list[str]: ...  # every key below prefix
    def delete_prefix(self, prefix: str) -> None: ...
    def delete(self, key: str) -> None: ...


@dataclass(frozen=True)
class Credentials:
    """Where and as whom to reach S3; every field None means boto3's defaults (the AWS_* env,
    then its default chain: web identity, container and instance credentials) and, for
    ``addressing_style``, ``PHOENIX_S3_ADDRESSING_STYLE``. Hashable, so a caller may cache
    storage per credentials. Never logged: ``repr`` leaves out the key pair and the token."""

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None
    session_token: str | None = None  # temporary credentials (STS) come with one
    addressing_style: str | None = None  # auto | path | virtual (contract.s3_addressing_style)

    def __repr__(self) -> str:  # keeps secrets out of logs and tracebacks
        return (f"Credentials(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
                f"addressing_style={self.addressing_style!r})")

    __str__ = __repr__


def open_storage(uri: str, credentials: Credentials | None = None, *,
                 bucket_root: Callable[[str, Credentials | None], Storage] | None = None
                 ) -> Storage:
    """Open ``s3://bucket/prefix`` or ``file:///abs/path`` (a bare absolute path also works).

    ``credentials`` apply to S3 only. ``bucket_root(bucket_uri, credentials)``, if given,
    supplies the storage for ``s3://bucket`` (the operator passes a cached one, so every job
    in a bucket shares one boto3 client); the result is its child at the prefix."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"checkpoint URI {uri!r} has no bucket; use s3://bucket/prefix")
        prefix = unquote(parsed.path).strip("/")
        if bucket_root is not None:
            root = bucket_root(f"s3://{parsed.netloc}", credentials)
            return root.child(prefix) if prefix else root
        c = credentials or Credentials()
        return S3Storage(parsed.netloc, prefix, endpoint_url=c.endpoint_url,
                         access_key=c.access_key, secret_key=c.secret_key, region=c.region,
                         session_token=c.session_token, addressing_style=c.addressing_style)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {uri!r} must be file:///absolute/path")
        return LocalStorage(unquote(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return LocalStorage(uri)
    raise ValueError(f"unsupported checkpoint URI {uri!r}; use s3://bucket/prefix or file:///abs/path")
