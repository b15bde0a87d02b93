"""A checkpoint streams from the in-memory snapshot into S3 (versitygw): no spool file, the
stored checksums still let the operator verify it with HEADs only, it loads back bit-exact,
and an upload that fails midway leaves no manifest and no incomplete multipart upload."""
from __future__ import annotations

import os
import tempfile
import threading

import pytest
import torch

from phoenix_trainer.checkpoint import AsyncCheckpointer, Snapshot, load_checkpoint
from phoenix_trainer.core.errors import StorageError
from phoenix_trainer.core.layout import (
    MANIFEST_NAME, latest_valid_checkpoint, step_dir_name, verify_checkpoint,
)
from phoenix_trainer.core.storage import Credentials, open_storage
from phoenix_trainer.core.writer import RetryPolicy
from trainer_procs import DiskWatch

pytestmark = pytest.mark.storage
MiB = 1 << 20


@pytest.fixture
def storage(s3_bucket, monkeypatch):
    monkeypatch.setenv("PHOENIX_S3_PART_MB", "5")  # the smallest S3 allows: many parts
    monkeypatch.setenv("PHOENIX_S3_CONCURRENCY", "2")
    # In this process, where the tests can watch and break its requests; the same writer
    # runs in the upload process by default (tests/storage/test_upload_process.py).
    monkeypatch.setenv("PHOENIX_UPLOAD_PROCESS", "0")
    ep = s3_bucket.endpoint
    return open_storage(f"{s3_bucket.uri}/job/train", Credentials(
        endpoint_url=ep.url, access_key=ep.access_key, secret_key=ep.secret_key))


@pytest.fixture
def empty_dirs(tmp_path, monkeypatch):
    """The spool and the process's temp dir, both empty, watched while the save runs."""
    spool, tmp = tmp_path / "spool", tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return spool, tmp


def state(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"model.pt": {"w": torch.randn(3 * MiB, generator=g),  # 12 MiB
                         "b": torch.randn(1000, generator=g, dtype=torch.float64)},
            "optimizer.pt": {"m": torch.randn(2 * MiB, generator=g)}}  # 8 MiB


def uploads_left(storage) -> list:
    return storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])


def test_a_streamed_checkpoint_spools_nothing_verifies_by_head_and_loads_bit_exact(storage, empty_dirs):
    spool, tmp = empty_dirs
    ck = AsyncCheckpointer(storage, phase="train", config_fingerprint="fp", spool_dir=str(spool))
    tensors = state(1)
    ops: list[str] = []
    storage.client.meta.events.register("before-call.s3", lambda model, **kw: ops.append(model.name))
    with DiskWatch(spool, tmp) as watch:
        ck.save(Snapshot.take(10, 0, tensors, {"trainer.json": {"step": 10}})).result()
    assert watch.peak == 0 and os.listdir(tmp) == [] and os.listdir(ck.spool) == []
    # The store's replies to each PUT and completion named the checksums it recorded: the
    # save needed no HEAD to learn them (and retention read back none of its own steps).
    assert "HeadObject" not in ops and ops.count("CompleteMultipartUpload") == 2

    info = verify_checkpoint(storage, 10, deep=False)
    files = info.manifest.files
    assert files["model.pt"].size > 2 * 5 * MiB and files["model.pt"].stored_checksum.endswith("-3")
    assert files["optimizer.pt"].stored_checksum.endswith("-2")
    assert "-" not in files["trainer.json"].stored_checksum  # one PUT: plain sha256
    # The part size is kept, so a restore recomputes the composite part by part, in parallel.
    assert files["model.pt"].restore_check() == (5 * MiB, files["model.pt"].stored_checksum)
    assert files["trainer.json"].restore_check() == (None, files["trainer.json"].sha256)

    ops.clear()
    assert verify_checkpoint(storage, 10, deep=True).valid
    assert ops.count("GetObject") == 1 and ops.count("HeadObject") == 3  # the manifest; no shard

    loaded = load_checkpoint(storage, latest_valid_checkpoint(storage, deep=True))
    for name, shard in tensors.items():
        for k, t in shard.items():
            assert torch.equal(loaded[name][k], t) and loaded[name][k].dtype == t.dtype
    assert uploads_left(storage) == []
    ck.close()

    # One byte of the multipart shard's second part changed, same size, uploaded afresh (so
    # the store's own checksum is of the damaged bytes): the composite check refuses it.
    from phoenix_trainer.core.errors import CorruptCheckpointError

    key = storage._key(f"{step_dir_name(10)}/model.pt")
    good = storage.client.get_object(Bucket=storage.bucket, Key=key)["Body"].read()
    bad = bytearray(good)
    bad[7 * MiB] ^= 1
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=bytes(bad))
    with pytest.raises(CorruptCheckpointError, match="model.pt composite sha256 of its parts mismatch"):
        load_checkpoint(storage, info)


def test_an_upload_failing_midway_leaves_no_manifest_and_no_incomplete_upload(storage, empty_dirs):
    spool, _ = empty_dirs
    sleeps: list[float] = []
    ck = AsyncCheckpointer(storage, phase="train", config_fingerprint="fp", spool_dir=str(spool),
                           retry=RetryPolicy(attempts=2, sleep=sleeps.append))
    ck.save(Snapshot.take(10, 0, state(1), {"trainer.json": {"step": 10}})).result()

    real = storage.client.upload_part
    parts = {"n": 0}

    def flaky_upload_part(**kw):
        parts["n"] += 1
        if parts["n"] > 2:  # model.pt has 3 parts: it fails midway, for good
            from botocore.exceptions import EndpointConnectionError
            raise EndpointConnectionError(endpoint_url="http://s3.invalid")
        return real(**kw)

    storage.client.upload_part = flaky_upload_part
    with pytest.raises(StorageError, match="upload part of .*model.pt"):
        ck.save(Snapshot.take(20, 0, state(2), {"trainer.json": {"step": 20}})).result()
    storage.client.upload_part = real

    assert len(sleeps) == 1  # the shard was streamed again once, from the snapshot
    d = step_dir_name(20)
    assert storage.size(f"{d}/{MANIFEST_NAME}") is None and storage.size(f"{d}/model.pt") is None
    assert uploads_left(storage) == []  # every attempt's parts were aborted
    assert latest_valid_checkpoint(storage, deep=True).step == 10
    assert os.listdir(ck.spool) == []
    ck.close()


def test_restore_reads_shards_with_parallel_ranged_gets_and_refuses_a_tampered_one(storage,
                                                                                 s3_bucket):
    """Several shards, each read as many 1 MiB ranged GETs, several in flight over the shards:
    loaded bit-exact. Then a shard replaced by one of the same size (other bytes), one cut
    short and one with a byte more: each refused by name, never loaded."""
    from phoenix_trainer.core.errors import CorruptCheckpointError
    from phoenix_trainer.core.storage import ReadConfig

    ck = AsyncCheckpointer(storage, phase="train", config_fingerprint="fp")
    tensors = {f"s{i}.pt": {"w": torch.randn(MiB // 4 * (i + 2))} for i in range(3)}  # 2-4 MiB
    ck.save(Snapshot.take(7, 0, tensors, {"trainer.json": {"step": 7}}), blocking=True)
    ck.close()
    info = latest_valid_checkpoint(storage, deep=False)
    ranges, lock, live, peak = [], threading.Lock(), [0], [0]
    real = storage.read_into

    def read_into(key, offset, view):
        with lock:
            ranges.append((key, offset, len(view)))
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            return real(key, offset, view)
        finally:
            with lock:
                live[0] -= 1

    storage.read_into = read_into
    cfg = ReadConfig(part_size=MiB, concurrency=4)
    out = load_checkpoint(storage, info, read=cfg)
    assert out["trainer.json"] == {"step": 7}
    for name, obj in tensors.items():
        assert torch.equal(out[name]["w"], obj["w"])
    d = step_dir_name(7)
    sizes = {n: info.manifest.files[n].size for n in tensors}
    for n, size in sizes.items():  # every byte of every shard, in 1 MiB ranges
        assert sorted((o, k) for key, o, k in ranges if key == f"{d}/{n}") == \
            [(o, min(MiB, size - o)) for o in range(0, size, MiB)]
    assert 1 < peak[0] <= 4

    c, key = s3_bucket.client(), f"job/train/{d}/s1.pt"
    good = c.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read()
    for bad, why in [(good[:MiB] + bytes([good[MiB] ^ 1]) + good[MiB + 1:], "s1.pt sha256 mismatch"),
                     (good[:-1], f"s1.pt has {len(good) - 1} bytes"),
                     (good[:MiB // 2], f"s1.pt has {MiB // 2} bytes"),
                     (good + b"x", f"s1.pt has {len(good) + 1} bytes")]:
        c.put_object(Bucket=s3_bucket.name, Key=key, Body=bad)
        with pytest.raises(CorruptCheckpointError, match=why):
            load_checkpoint(storage, info, read=cfg)


@pytest.mark.parametrize("signed", ["", "1"], ids=["unsigned-body", "signed-body"])
def test_a_part_changed_in_flight_is_refused_whether_or_not_its_body_is_signed(
        s3_bucket, empty_dirs, monkeypatch, signed):
    """By default the trainer does not SigV4-sign request bodies (one SHA-256 pass less over
    every byte, on both ends, on plain-HTTP endpoints): each part's SHA-256 travels in a
    signed header instead, so a body changed on the way still never becomes an object.
    ``PHOENIX_S3_SIGN_PAYLOAD=1`` signs the body as well."""
    monkeypatch.setenv("PHOENIX_S3_SIGN_PAYLOAD", signed)
    monkeypatch.setenv("PHOENIX_S3_PART_MB", "5")
    monkeypatch.setenv("PHOENIX_UPLOAD_PROCESS", "0")  # the hook below is this process's
    ep = s3_bucket.endpoint
    storage = open_storage(f"{s3_bucket.uri}/job/flight-{signed or 'no'}", Credentials(
        endpoint_url=ep.url, access_key=ep.access_key, secret_key=ep.secret_key))
    seen: list[str] = []

    def change_second_part(request, **_):
        sha = request.headers["X-Amz-Content-SHA256"]
        seen.append(sha.decode() if isinstance(sha, bytes) else sha)
        if "partNumber=2" in request.url:
            body = bytearray(request.body.read() if hasattr(request.body, "read") else request.body)
            body[12345] ^= 1
            request.body = bytes(body)

    storage.client.meta.events.register("before-send.s3.UploadPart", change_second_part)
    ck = AsyncCheckpointer(storage, phase="train", config_fingerprint="fp",
                           spool_dir=str(empty_dirs[0]), retry=RetryPolicy(attempts=1))
    with pytest.raises(StorageError, match="upload part of .*model.pt"):
        ck.save(Snapshot.take(10, 0, state(1), {"trainer.json": {"step": 10}})).result()
    ck.close()
    expected = "UNSIGNED-PAYLOAD" if not signed else None
    assert seen and all((h == expected) if expected else (len(h) == 64) for h in seen), seen
    assert storage.size(f"{step_dir_name(10)}/model.pt") is None
    assert storage.size(f"{step_dir_name(10)}/{MANIFEST_NAME}") is None
    assert uploads_left(storage) == []
