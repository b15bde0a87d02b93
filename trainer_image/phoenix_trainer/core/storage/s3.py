"""``s3://bucket/prefix``: checkpoint storage in S3 through boto3 (``S3Storage``), and the
stream writer that uploads a shard from memory as a multipart upload.

S3 PUT/CompleteMultipartUpload are atomic, so an object is visible only when complete (what
the manifest-last rule needs). boto3 is imported lazily; never torch. Never log
credentials. Retries with backoff for whole-shard uploads live in ``core/writer.py``; here
botocore's own retry handles single requests.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Iterator

from ..contract import (
    ENV_AWS_ENDPOINT_URL, addressing_style_from_env, s3_addressing_style, sign_payload_from_env,
    upload_process_from_env,
)
from ..errors import StorageError
from .buffers import PartBuffer, PartBuffers
from .entry import Digest, FileEntry, composite_sha256, join_key
from .upload_proc import ProcStreamWriter, UploadProcess

log = logging.getLogger("phoenix.storage")


# Every object is uploaded with an S3 SHA256 checksum: the server checks each part against it
# on the way in and keeps it, so a reader can later ask "is this the object that was
# uploaded?" with a HEAD instead of downloading it (layout.verify_checkpoint).
CHECKSUM_ALGORITHM = "SHA256"
GET_CHUNK_BYTES = 8 << 20  # a download is read (and hashed) this much at a time


def default_transfer_config():
    """Multipart settings tuned for checkpoint shards of tens of MB to GBs.

    boto3's default (8 MiB parts, 10 threads) is fine for big files; we raise the part size
    so a multi-GB shard stays well under S3's 10,000-part limit, and keep enough threads to
    fill a NIC. Overridable via PHOENIX_S3_PART_MB / PHOENIX_S3_CONCURRENCY.
    """
    from boto3.s3.transfer import TransferConfig

    part = int(os.environ.get("PHOENIX_S3_PART_MB", "16")) * 1024 * 1024
    threads = int(os.environ.get("PHOENIX_S3_CONCURRENCY", "8"))
    return TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                          max_concurrency=threads, use_threads=True, io_chunksize=1 << 20)


S3_MIN_PART = 5 * 1024 * 1024  # every part but the last must be at least this big
S3_MAX_PARTS = 10_000


def stream_part_size(part_size: int, size_hint: int | None) -> int:
    """The part size for a streamed object: the configured one, raised (in whole MiB) so an
    object of about ``size_hint`` bytes fits in 9,000 parts (S3 allows 10,000; the hint is
    an estimate)."""
    part = max(S3_MIN_PART, part_size)
    if size_hint:
        need = -(-size_hint // 9_000)
        part = max(part, -(-need // (1 << 20)) * (1 << 20))
    return part


class _S3StreamWriter:
    """Streams one object into S3 from a bounded buffer.

    Bytes are hashed (sha256 of the whole object) and copied into parts of ``part_size``
    (``buffers.PartBuffer``: reused across uploads, large copies without the GIL);
    each full part is uploaded with its own SHA256 checksum (the server checks it) by a pool
    of ``in_flight`` threads. ``write`` blocks while ``in_flight`` parts are uploading, so
    memory is at most (``in_flight`` + 1) x ``part_size`` whatever the object's size, and no
    byte touches local disk. An object smaller than one part is one PutObject (its stored
    checksum is then the plain sha256). ``commit`` completes the upload and returns the
    checksum S3 records for it, computed here from the parts (``composite_sha256``), so the
    caller can check the store recorded exactly what was hashed: the entry is ``confirmed``
    when the store's reply to the PUT or the completion already names that checksum (S3 and
    the lab's servers do), and the caller then needs no HEAD. Any failure aborts the
    multipart upload: no object and no orphaned parts are left.

    Every byte is hashed twice, on purpose: the whole object's sha256 (the manifest's, what a
    restore checks) and its part's (what S3 checks on the way in and composes into the
    stored checksum a HEAD verifies). Neither digest can be derived from the other, and S3
    keeps no full-object SHA-256 for a multipart upload (only CRCs), so dropping either pass
    would drop one of the two checks. They run on different threads (this writer, the part
    pool), so the second pass costs CPU, not time on the writer's path.
    """

    def __init__(self, storage: "S3Storage", key: str, part_size: int, in_flight: int) -> None:
        self.s, self.key, self.full_key = storage, key, storage._key(key)
        self.part_size, self.in_flight = part_size, max(1, in_flight)
        self.digest = Digest()
        self.buf: PartBuffer | None = None  # the part being filled, from storage.part_buffers
        self.fill = 0  # bytes of it filled
        self.upload_id: str | None = None
        self.pending: list[Future] = []  # oldest first
        self.parts: list[tuple[dict, bytes]] = []  # (part for CompleteMultipartUpload, raw sha256)
        self.pool: ThreadPoolExecutor | None = None
        self.done = False

    # -- the writing thread -----------------------------------------------------------------
    def write(self, data: Any) -> int:
        if self.done:
            raise ValueError(f"write to {self.s.uri_for(self.key)} after commit or abort")
        mv = memoryview(data).cast("B")
        self.digest.update(mv)
        off = 0
        while off < len(mv):
            if self.buf is None:
                self.buf, self.fill = self.s.part_buffers.take(self.part_size), 0
            take = min(self.part_size - self.fill, len(mv) - off)
            self.buf.fill(self.fill, mv[off:off + take])
            self.fill += take
            off += take
            if self.fill == self.part_size:
                self._ship()
        return len(mv)

    def flush(self) -> None:
        pass  # parts go out when full; the rest on commit

    def _ship(self) -> None:
        if len(self.parts) + len(self.pending) >= S3_MAX_PARTS:
            raise StorageError(
                f"{self.s.uri_for(self.key)} needs more than {S3_MAX_PARTS} parts of"
                f" {self.part_size >> 20} MiB; raise PHOENIX_S3_PART_MB")
        if self.upload_id is None:
            with self.s._errors("create multipart upload", self.key):
                self.upload_id = self.s.client.create_multipart_upload(
                    Bucket=self.s.bucket, Key=self.full_key,
                    ChecksumAlgorithm=CHECKSUM_ALGORITHM)["UploadId"]
            self.pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="phoenix-part")
        # Finished parts are collected as soon as they are done (a failure stops the stream
        # at the next part, not at the end); then wait for a free slot.
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.in_flight):
            self._collect_oldest()
        buf, fill, self.buf, self.fill = self.buf, self.fill, None, 0
        if fill == self.part_size:
            body, reuse = buf.data, buf
        else:  # the last part, shorter: its own bytearray; the buffer goes back at once
            body, reuse = buf.prefix(fill), None
            self.s.part_buffers.give(buf)
        number = len(self.parts) + len(self.pending) + 1
        self.pending.append(self.pool.submit(self._upload_part, number, body, reuse))

    def _collect_oldest(self) -> None:
        fut = self.pending.pop(0)
        with self.s._errors("upload part of", self.key):
            self.parts.append(fut.result())

    # -- part threads ---------------------------------------------------------------------
    def _upload_part(self, number: int, body: bytearray,
                     reuse: PartBuffer | None) -> tuple[dict, bytes]:
        try:
            raw = hashlib.sha256(body).digest()
            b64 = base64.b64encode(raw).decode()
            resp = self.s.client.upload_part(
                Bucket=self.s.bucket, Key=self.full_key, UploadId=self.upload_id,
                PartNumber=number, Body=body, ChecksumSHA256=b64)
        finally:  # the request is over, sent or not: nothing reads the buffer any more
            if reuse is not None:
                self.s.part_buffers.give(reuse)
        return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": b64}, raw

    # -- the end --------------------------------------------------------------------------
    def commit(self) -> FileEntry:
        if self.done:
            raise ValueError(f"{self.s.uri_for(self.key)} was already committed or aborted")
        try:
            entry = self._complete()
        except BaseException:
            self.abort()
            raise
        self.done = True
        return entry

    def _complete(self) -> FileEntry:
        sha = self.digest.h.hexdigest()
        if self.upload_id is None:  # smaller than one part: a single PUT, full-object checksum
            b64 = base64.b64encode(bytes.fromhex(sha)).decode()
            buf, fill, self.buf, self.fill = self.buf, self.fill, None, 0
            body = buf.prefix(fill) if buf is not None else b""
            if buf is not None:
                self.s.part_buffers.give(buf)
            with self.s._errors("put", self.key):
                resp = self.s.client.put_object(Bucket=self.s.bucket, Key=self.full_key,
                                                Body=body, ChecksumSHA256=b64)
            return FileEntry(size=self.digest.n, sha256=sha, stored_checksum=b64,
                             confirmed=resp.get("ChecksumSHA256") == b64)
        if self.buf is not None:
            self._ship()
        while self.pending:
            self._collect_oldest()
        self.pool.shutdown()
        with self.s._errors("complete multipart upload", self.key):
            resp = self.s.client.complete_multipart_upload(
                Bucket=self.s.bucket, Key=self.full_key, UploadId=self.upload_id,
                MultipartUpload={"Parts": [p for p, _ in self.parts]})
        composite = composite_sha256([d for _, d in self.parts])
        return FileEntry(size=self.digest.n, sha256=sha, part_size=self.part_size,
                         stored_checksum=composite,
                         confirmed=resp.get("ChecksumSHA256") == composite)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        if self.buf is not None:
            self.s.part_buffers.give(self.buf)
            self.buf = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
        if self.upload_id is None:
            return
        try:
            with self.s._errors("abort multipart upload", self.key):
                self.s.client.abort_multipart_upload(Bucket=self.s.bucket, Key=self.full_key,
                                                     UploadId=self.upload_id)
        except Exception as e:  # noqa: BLE001 - the original error matters more
            # Parts of an upload nobody completes are invisible to readers but cost storage
            # until a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes them.
            log.warning("could not abort the multipart upload %s of %s (%s); its parts stay"
                        " until the bucket's AbortIncompleteMultipartUpload rule removes them",
                        self.upload_id, self.s.uri_for(self.key), e)


def client_addressing_style(requested: str | None, endpoint_url: str | None,
                            environ=None) -> str:
    """botocore's ``s3.addressing_style`` for a client: ``requested`` (None: the trainer's
    ``PHOENIX_S3_ADDRESSING_STYLE``, unset = auto) resolved against the endpoint the client
    will use (None: ``AWS_ENDPOINT_URL``, which boto3 reads itself) by
    ``contract.s3_addressing_style``, the one place that decides."""
    environ = os.environ if environ is None else environ
    if requested is None:
        requested = addressing_style_from_env(environ)
    endpoint = endpoint_url or environ.get(ENV_AWS_ENDPOINT_URL) or None
    return s3_addressing_style(requested, endpoint)


def _parent_dirs(root: str, keys: list[str]) -> set[str]:
    """``root/`` and every ``dir/`` between it and ``keys`` (all of which lie under it)."""
    out = {root + "/"}
    for key in keys:
        parts = key[len(root) + 1:].split("/")[:-1]
        for n in range(1, len(parts) + 1):
            out.add("/".join([root, *parts[:n]]) + "/")
    return out


class S3Storage:
    """``s3://bucket/prefix`` through boto3. Endpoint and credentials default to AWS_* env."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None,
                 region: str | None = None, session_token: str | None = None,
                 addressing_style: str | None = None, transfer_config=None,
                 client=None, part_buffers: PartBuffers | None = None,
                 uploader: UploadProcess | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.transfer_config = transfer_config or default_transfer_config()
        # Streamed uploads' parts, kept between uploads: at most what one upload has out at
        # once (its in-flight parts and the one being filled). Shared with child().
        self.part_buffers = part_buffers or PartBuffers(self.transfer_config.max_concurrency + 1)
        # Where streamed uploads run (upload_proc.py): a helper process that builds the same
        # client from the same settings; only for a client made here, whose settings are known.
        self.uploader = uploader
        if client is None and uploader is None and upload_process_from_env():
            self.uploader = UploadProcess(
                {"endpoint_url": endpoint_url, "access_key": access_key, "secret_key": secret_key,
                 "region": region, "session_token": session_token,
                 "addressing_style": addressing_style},
                self.transfer_config.multipart_chunksize, self.transfer_config.max_concurrency)
        if client is None:
            config = Config(
                # Path-style for S3-compatible servers, virtual-hosted on AWS, unless asked.
                s3={"addressing_style": client_addressing_style(addressing_style, endpoint_url),
                    "payload_signing_enabled": sign_payload_from_env()},
                # Fail fast when S3 is unreachable; checkpoint.py retries whole shards with
                # backoff, which is what survives a network blip without blocking training.
                connect_timeout=5, read_timeout=60,
                retries={"mode": "standard", "max_attempts": 3},
                max_pool_connections=max(16, self.transfer_config.max_concurrency * 2),
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key,
                aws_secret_access_key=secret_key, aws_session_token=session_token,
                region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                config=config)
        self.client = client

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def child(self, sub: str) -> "S3Storage":
        """The same bucket and client, rooted at ``<prefix>/<sub>``."""
        return S3Storage(self.bucket, join_key(self.prefix, sub), client=self.client,
                         transfer_config=self.transfer_config, part_buffers=self.part_buffers,
                         uploader=self.uploader)

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextlib.contextmanager
    def _errors(self, what: str, key: str):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(self.uri_for(key)) from e
            raise StorageError(f"S3 {what} {self.uri_for(key)} failed: {code or e}") from e
        except BotoCoreError as e:
            raise StorageError(
                f"S3 {what} {self.uri_for(key)} failed: {e}; check AWS_ENDPOINT_URL, the AWS_* credentials"
                f" and that the server is reachable") from e

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors("put", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   ChecksumAlgorithm=CHECKSUM_ALGORITHM)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        from boto3.exceptions import S3UploadFailedError

        with self._errors("upload", key):
            try:
                self.client.upload_file(str(path), self.bucket, self._key(key),
                                        Config=self.transfer_config,
                                        ExtraArgs={"ChecksumAlgorithm": CHECKSUM_ALGORITHM})
            except S3UploadFailedError as e:
                raise StorageError(f"S3 upload {self.uri_for(key)} failed: {e}") from e

    def prepare_uploads(self) -> None:
        """Start the upload process (``UploadProcess.start``) unless it runs already."""
        if self.uploader is not None:
            self.uploader.start()

    def open_write(self, key: str, size_hint: int | None = None) -> "_S3StreamWriter | ProcStreamWriter":
        """A stream into ``key``: through the upload process where there is one and it is
        free, else uploaded from this process; the same parts, checksums and aborts."""
        if self.uploader is not None:
            w = self.uploader.writer(self.bucket, self._key(key), size_hint)
            if w is not None:
                return w
        cfg = self.transfer_config
        return _S3StreamWriter(self, key, stream_part_size(cfg.multipart_chunksize, size_hint),
                               cfg.max_concurrency)

    def get_bytes(self, key: str) -> bytes:
        with self._errors("get", key):
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read()

    def get_bytes_sha256(self, key: str) -> tuple[bytes, str]:
        """Hashed chunk by chunk as the body arrives: while a chunk is hashed (without the
        GIL) the next one keeps arriving, so a download and its verification take about as
        long as the download alone, instead of one after the other."""
        digest, chunks = hashlib.sha256(), []
        with self._errors("get", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            while chunk := body.read(GET_CHUNK_BYTES):
                digest.update(chunk)
                chunks.append(chunk)
        return b"".join(chunks), digest.hexdigest()

    def read_into(self, key: str, offset: int, view: Any) -> int:
        """One ranged GET of ``len(view)`` bytes at ``offset`` straight into ``view`` (read
        into it, no chunk copies); the object's total size from ``Content-Range``. A range
        past the end (the object is shorter) fills nothing and returns the size; the caller
        (``parallel.read_parallel``) refuses any size it did not expect."""
        from botocore.exceptions import ClientError

        mv = memoryview(view).cast("B")
        n = len(mv)
        if n == 0:
            size = self.size(key)
            if size is None:
                raise FileNotFoundError(self.uri_for(key))
            return size
        with self._errors("get", key):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                              Range=f"bytes={offset}-{offset + n - 1}")
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) != "InvalidRange":
                    raise
                resp = None
        if resp is None:
            size = self.size(key)
            if size is None:
                raise FileNotFoundError(self.uri_for(key))
            return size
        body = resp["Body"]
        try:
            content_range = resp.get("ContentRange") or ""
            if "/" in content_range:
                total = int(content_range.rsplit("/", 1)[1])
            elif offset == 0:  # the server sent the whole object instead of the range
                total = int(resp["ContentLength"])
            else:
                raise StorageError(f"S3 get {self.uri_for(key)}: the server ignored the Range"
                                   " header; ranged reads need an S3 server that honours it")
            got = 0
            with self._errors("get", key):
                while got < n and (k := body.readinto(mv[got:])):
                    got += k
            if got < n and total >= offset + n:
                raise StorageError(f"S3 get {self.uri_for(key)}: {got} of {n} bytes at"
                                   f" {offset} arrived")
            return total
        finally:
            body.close()

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        with self._errors("download", key):
            self.client.download_file(self.bucket, self._key(key), str(path),
                                      Config=self.transfer_config)

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        with self._errors("get", key):
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        body = resp["Body"]
        try:
            yield body
        finally:
            body.close()

    def size(self, key: str) -> int | None:
        return self.stat(key)[0]

    def stat(self, key: str) -> tuple[int | None, str | None]:
        try:
            with self._errors("head", key):
                resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key),
                                               ChecksumMode="ENABLED")
        except FileNotFoundError:
            return None, None
        return int(resp["ContentLength"]), resp.get("ChecksumSHA256")

    def list_dirs(self, prefix: str) -> list[str]:
        full = join_key(self.prefix, prefix)
        full = full + "/" if full else ""
        out: list[str] = []
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=full, Delimiter="/"):
                for cp in page.get("CommonPrefixes", []):
                    out.append(cp["Prefix"][len(full):].rstrip("/"))
        return sorted(out)

    def list_keys(self, prefix: str) -> list[str]:
        full = join_key(self.prefix, prefix)
        base = self.prefix + "/" if self.prefix else ""
        out: list[str] = []
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=(full + "/") if full else ""):
                out.extend(obj["Key"][len(base):] for obj in page.get("Contents", []))
        return sorted(out)

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.strip("/"):
            raise StorageError(f"refusing to delete the whole storage root {self.uri}")
        keys = self.list_keys(prefix)
        with self._errors("delete", prefix):
            for i in range(0, len(keys), 1000):
                batch = [{"Key": join_key(self.prefix, k)} for k in keys[i:i + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            # Stores built on a filesystem or a filer (SeaweedFS) keep a directory whose
            # objects are gone and list it as a CommonPrefix, so a deleted step would be
            # listed forever as an incomplete checkpoint. Deleting "<dir>/", deepest first,
            # removes such an empty directory there; on S3 it is a no-op (no such key).
            dirs = sorted(_parent_dirs(join_key(self.prefix, prefix.strip("/")),
                                       [join_key(self.prefix, k) for k in keys]),
                          key=lambda d: (-d.count("/"), d))
            for i in range(0, len(dirs), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": d} for d in dirs[i:i + 1000]], "Quiet": True})

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"
