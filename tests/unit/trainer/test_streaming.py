"""Shards stream from memory into storage: fixed-size parts, hashed on the way, a bounded
number in flight, and nothing left behind when anything fails. S3 here is a fake client
that records the calls (the real server: tests/storage/test_streamed_checkpoint.py)."""
from __future__ import annotations

import base64
import hashlib
import os
import threading
import time

import pytest
import torch
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from phoenix_trainer.checkpoint import (AsyncCheckpointer, Snapshot, check_spool_room,
                                        load_checkpoint, spool_limit_bytes)
from phoenix_trainer.core.contract import ENV_SPOOL_LIMIT_MB
from phoenix_trainer.core.errors import CheckpointError, SpoolFullError, StorageError
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.core.storage import buffers
from phoenix_trainer.core.storage.buffers import GIL_FREE_COPY_MIN, PartBuffer
from phoenix_trainer.core.storage.s3 import (
    S3_MIN_PART, S3Storage, composite_sha256, stream_part_size,
)
from phoenix_trainer.core.writer import RetryPolicy, StreamedShard, stream_object, upload_shards

pytestmark = pytest.mark.unit
MiB = 1 << 20
PART = S3_MIN_PART  # the smallest part S3 allows


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class FakeS3:
    """Just enough of a boto3 S3 client for the stream writer; ``fail_part`` makes that
    part number's upload fail; ``part_delay`` slows every part so in-flight ones overlap."""

    def __init__(self, fail_part: int | None = None, part_delay: float = 0.0,
                 reply_checksum: bool = True) -> None:
        self.fail_part, self.part_delay = fail_part, part_delay
        # S3 (and both lab servers) name the checksum they recorded in the reply to a PUT and
        # to a completion; False plays a store that does not.
        self.reply_checksum = reply_checksum
        self.calls: list[str] = []
        self.parts: dict[int, bytes] = {}
        self.objects: dict[str, bytes] = {}
        self.recorded: dict[str, str] = {}  # key -> the checksum the store keeps for it
        self.open_uploads: set[str] = set()
        self.running = self.max_running = 0
        self.lock = threading.Lock()

    def create_multipart_upload(self, Bucket, Key, ChecksumAlgorithm):
        assert ChecksumAlgorithm == "SHA256"
        self.calls.append("create")
        self.open_uploads.add("u1")
        return {"UploadId": "u1"}

    def upload_part(self, Bucket, Key, UploadId, PartNumber, Body, ChecksumSHA256):
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            time.sleep(self.part_delay)
            if PartNumber == self.fail_part:
                raise ClientError({"Error": {"Code": "InternalError"}}, "UploadPart")
            assert ChecksumSHA256 == b64sha(bytes(Body)), "the server would answer BadDigest"
            with self.lock:
                self.parts[PartNumber] = bytes(Body)
            return {"ETag": f'"{PartNumber}"'}
        finally:
            with self.lock:
                self.running -= 1

    def complete_multipart_upload(self, Bucket, Key, UploadId, MultipartUpload):
        self.calls.append("complete")
        numbers = [p["PartNumber"] for p in MultipartUpload["Parts"]]
        assert numbers == sorted(self.parts) == list(range(1, len(numbers) + 1))
        self.objects[Key] = b"".join(self.parts[n] for n in numbers)
        self.open_uploads.discard(UploadId)
        composite = composite_sha256([hashlib.sha256(self.parts[n]).digest() for n in numbers])
        self.recorded[Key] = composite
        return {"ChecksumSHA256": composite} if self.reply_checksum else {}

    def abort_multipart_upload(self, Bucket, Key, UploadId):
        self.calls.append("abort")
        self.open_uploads.discard(UploadId)

    def head_object(self, Bucket, Key, ChecksumMode):
        self.calls.append("head")
        body = self.objects[Key]
        return {"ContentLength": len(body), "ChecksumSHA256": self.recorded[Key]}

    def delete_object(self, Bucket, Key):
        self.calls.append("delete")
        self.objects.pop(Key, None)

    def put_object(self, Bucket, Key, Body, ChecksumSHA256):
        assert ChecksumSHA256 == b64sha(Body)
        self.calls.append("put")
        self.objects[Key] = bytes(Body)
        self.recorded[Key] = ChecksumSHA256
        return {"ChecksumSHA256": ChecksumSHA256} if self.reply_checksum else {}


def s3(client: FakeS3, in_flight: int = 2) -> S3Storage:
    cfg = TransferConfig(multipart_chunksize=PART, multipart_threshold=PART, max_concurrency=in_flight)
    return S3Storage("bkt", "job", client=client, transfer_config=cfg)


def chunks(data: bytes, sizes):
    """``data`` cut into writes of the given sizes (cycled), like torch.save's mix of tiny
    headers and whole tensors."""
    out, off, i = [], 0, 0
    while off < len(data):
        n = sizes[i % len(sizes)]
        out.append(memoryview(data)[off:off + n])
        off, i = off + n, i + 1
    return out


def test_parts_are_fixed_size_hashed_and_the_composite_is_what_s3_records():
    data = os.urandom(3 * PART + PART // 2)
    client = FakeS3()
    w = s3(client).open_write("step-1/model.pt")
    for piece in chunks(data, [7, 100, 2 * PART + 3, 64 * 1024]):  # one write spans 2+ parts
        w.write(piece)
    entry = w.commit()
    assert [len(client.parts[n]) for n in sorted(client.parts)] == [PART, PART, PART, PART // 2]
    assert client.objects["job/step-1/model.pt"] == data
    assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    digests = [hashlib.sha256(client.parts[n]).digest() for n in sorted(client.parts)]
    assert entry.stored_checksum == composite_sha256(digests) and entry.stored_checksum.endswith("-4")
    assert client.calls == ["create", "complete"] and not client.open_uploads


def test_an_object_smaller_than_a_part_is_one_put_with_its_full_sha256():
    client = FakeS3()
    w = s3(client).open_write("step-1/trainer.json")
    w.write(b'{"step": 1}')
    entry = w.commit()
    assert client.calls == ["put"] and entry.stored_checksum == b64sha(b'{"step": 1}')


def test_exactly_one_part_is_a_multipart_upload_of_one():
    client = FakeS3()
    w = s3(client).open_write("k")
    w.write(os.urandom(PART))
    assert w.commit().stored_checksum.endswith("-1") and client.calls == ["create", "complete"]


def test_parts_in_flight_are_bounded():
    client = FakeS3(part_delay=0.05)
    w = s3(client, in_flight=2).open_write("k")
    for piece in chunks(os.urandom(6 * PART), [PART // 3]):
        w.write(piece)
        # what the writer holds: the part being filled plus at most 2 uploading
        assert len(w.pending) <= 2 and w.fill < PART
    w.commit()
    assert client.max_running == 2 and len(client.parts) == 6


def test_a_failed_part_aborts_the_upload_and_nothing_is_completed():
    client = FakeS3(fail_part=2)
    shard = StreamedShard(lambda f: [f.write(c) for c in chunks(os.urandom(5 * PART), [MiB])])
    with pytest.raises(StorageError, match="InternalError"):
        stream_object(s3(client, in_flight=1), "k", shard)
    assert "complete" not in client.calls and client.calls[-1] == "abort"
    assert not client.open_uploads and not client.objects


def test_a_producer_that_fails_midway_aborts_the_upload():
    client = FakeS3()

    def produce(f):
        f.write(os.urandom(2 * PART + 1))
        raise RuntimeError("torch.save ran into an unpicklable object")

    with pytest.raises(RuntimeError, match="unpicklable"):
        stream_object(s3(client), "k", StreamedShard(produce))
    assert client.calls == ["create", "abort"] and not client.open_uploads and not client.objects


def test_a_retry_streams_the_shard_again_from_the_start():
    client = FakeS3(fail_part=1)
    calls = []
    data = os.urandom(PART + 10)

    class HealOnRetry:  # the second attempt's part 1 succeeds
        def __getattr__(self, name):
            return getattr(client, name)

        def upload_part(self, **kw):
            if client.calls.count("create") > 1:
                client.fail_part = None
            return client.upload_part(**kw)

    st = s3(client)
    st.client = HealOnRetry()

    def produce(f):
        f.write(data)
        calls.append(1)

    entry = RetryPolicy(attempts=3, sleep=lambda s: None).run(
        "stream", lambda: stream_object(st, "k", StreamedShard(produce)))
    assert len(calls) == 2 and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert client.calls == ["create", "abort", "create", "complete"]
    assert client.objects["job/k"] == data


def test_part_buffers_are_reused_from_one_upload_to_the_next_and_bounded(monkeypatch):
    made = []

    class Counted(PartBuffer):
        def __init__(self, size):
            super().__init__(size)
            made.append(size)

    monkeypatch.setattr(buffers, "PartBuffer", Counted)
    client = FakeS3()
    st = s3(client, in_flight=2)
    first = os.urandom(4 * PART)
    for key in ("step-1/model.pt", "step-2/model.pt"):  # whole parts: no shorter last one
        w = st.child("x").open_write(key)  # a child shares its parent's buffers
        for piece in chunks(first, [PART // 2 + 1]):
            w.write(piece)
        w.commit()
        assert client.objects[f"job/x/{key}"] == first
        # between uploads: at most what one upload holds (2 in flight + 1 filling)
        assert 0 < st.part_buffers.idle_bytes() <= 3 * PART
    assert len(made) <= 3  # the second upload made none


def test_a_part_buffer_copies_read_only_views_and_refuses_what_does_not_fit():
    buf = PartBuffer(2 * GIL_FREE_COPY_MIN)
    big = os.urandom(GIL_FREE_COPY_MIN + 5)  # the ctypes copy, without the GIL
    buf.fill(3, memoryview(big))  # bytes: a read-only buffer, as torch.save hands over
    buf.fill(3 + len(big), memoryview(b"tail"))  # a small one: a slice assignment
    assert bytes(buf.data[3:3 + len(big) + 4]) == big + b"tail"
    assert buf.prefix(7) == bytearray(buf.data[:7]) and len(buf.prefix(7)) == 7
    with pytest.raises(ValueError, match="do not fit"):
        buf.fill(len(buf.data) - 2, memoryview(b"abc"))
    with pytest.raises((BufferError, ValueError)):
        buf.fill(0, memoryview(bytearray(4 * GIL_FREE_COPY_MIN))[::2])  # not contiguous


@pytest.mark.parametrize("size", [100, 2 * PART + 1])  # one PUT; a multipart upload
@pytest.mark.parametrize("reply", [True, False])
def test_a_stream_the_store_confirmed_needs_no_head(size, reply):
    """The store's reply to the PUT or the completion names the checksum it recorded: the
    writer marks the entry confirmed and the commit skips the HEAD; a store that does not
    say gets the HEAD (and its checksum is still compared)."""
    client = FakeS3(reply_checksum=reply)
    data = os.urandom(size)
    got = upload_shards(s3(client), 7, {"model.pt": StreamedShard(lambda f: f.write(data))})
    entry = got["model.pt"]
    assert entry.confirmed is reply and entry.stored_checksum == client.recorded["job/step-0000000007/model.pt"]
    assert ("head" in client.calls) is (not reply)
    assert "confirmed" not in repr(entry)  # never part of what a manifest says


def test_part_size_grows_so_a_huge_shard_fits_in_the_part_limit():
    assert stream_part_size(16 * MiB, None) == 16 * MiB
    assert stream_part_size(1, None) == S3_MIN_PART
    big = 500 << 30  # 500 GiB: 16 MiB parts would need 32,000
    part = stream_part_size(16 * MiB, big)
    assert part % MiB == 0 and big / part <= 9_000


def test_local_writer_is_atomic_and_abort_leaves_nothing(tmp_path):
    st = LocalStorage(tmp_path)
    w = st.open_write("step-1/model.pt")
    w.write(b"abc")
    assert st.size("step-1/model.pt") is None  # not visible before commit
    entry = w.commit()
    assert (tmp_path / "step-1/model.pt").read_bytes() == b"abc"
    assert entry.sha256 == hashlib.sha256(b"abc").hexdigest() and entry.stored_checksum is None
    w = st.open_write("step-2/model.pt")
    w.write(b"partial")
    w.abort()
    assert os.listdir(tmp_path / "step-2") == []


def test_a_checkpoint_streams_no_file_into_the_spool(tmp_path):
    seen = []

    class Watch(LocalStorage):
        def open_write(self, key, size_hint=None):
            seen.append((key, os.listdir(ck.spool)))
            return super().open_write(key, size_hint)

    ck = AsyncCheckpointer(Watch(tmp_path / "ckpt"), phase="train", config_fingerprint="fp",
                           spool_dir=str(tmp_path / "spool"))
    w = torch.randn(256, 256)
    ck.save(Snapshot.take(3, 0, {"model.pt": {"w": w}}, {"trainer.json": {"step": 3}})).result()
    assert sorted(k for k, _ in seen) == ["step-0000000003/model.pt", "step-0000000003/trainer.json"]
    assert all(listing == [] for _, listing in seen)
    loaded = load_checkpoint(ck.storage, ck.latest)
    assert torch.equal(loaded["model.pt"]["w"], w)
    ck.close()


def test_spool_room_is_checked_against_the_limit_and_names_the_setting(tmp_path, monkeypatch):
    (tmp_path / "earlier").write_bytes(b"x" * 400)
    check_spool_room(str(tmp_path), 500, "step 7", limit=1000, free=10**9)
    with pytest.raises(SpoolFullError, match=f"step 7 needs .* {ENV_SPOOL_LIMIT_MB}=") as e:
        check_spool_room(str(tmp_path), 700, "step 7", limit=1000, free=10**9)
    assert isinstance(e.value, CheckpointError)  # what Session.fail reports as the reason
    with pytest.raises(SpoolFullError, match="free there"):
        check_spool_room(str(tmp_path), 700, "step 7", limit=None, free=600)
    monkeypatch.setenv(ENV_SPOOL_LIMIT_MB, "0.5")
    assert spool_limit_bytes() == 500_000
    monkeypatch.setenv(ENV_SPOOL_LIMIT_MB, "lots")
    with pytest.raises(CheckpointError, match=ENV_SPOOL_LIMIT_MB):
        spool_limit_bytes()
