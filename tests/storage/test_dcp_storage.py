"""DCP straight to S3 (versitygw): the sharded state streams from memory into objects with no
local file, the commit's manifest vouches for it (HEADs only), a restore reads only the
blocks holding the items asked for and checks each against its checksum, and a torn or
damaged save is never resumed from.

One process (``no_dist``): the gang's collectives are exercised by tests/storage/
test_distributed.py; here the storage side, byte for byte.
"""
from __future__ import annotations

import os
import tempfile
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp

from phoenix_trainer.core.errors import CorruptCheckpointError, StorageError
from phoenix_trainer.core.layout import (
    MANIFEST_NAME, latest_valid_checkpoint, step_dir_name, verify_checkpoint,
)
from phoenix_trainer.core.storage import Credentials, ReadConfig, open_storage
from phoenix_trainer.core.writer import RetryPolicy, publish_manifest
from phoenix_trainer import dcp_storage
from phoenix_trainer.dcp_storage import Staging, StorageReader, StorageWriter, vouch_files
from phoenix_trainer.shard_cache import ShardCache

pytestmark = pytest.mark.storage
MiB = 1 << 20
BLOCK = 256 << 10


@pytest.fixture
def storage(s3_bucket, monkeypatch):
    monkeypatch.setenv("PHOENIX_S3_PART_MB", "5")  # the smallest S3 allows: many parts
    ep = s3_bucket.endpoint
    return open_storage(f"{s3_bucket.uri}/job/train", Credentials(
        endpoint_url=ep.url, access_key=ep.access_key, secret_key=ep.secret_key))


@pytest.fixture
def storage_here(s3_bucket, monkeypatch):
    """Uploads from this process (no upload process), whose client a test can break."""
    monkeypatch.setenv("PHOENIX_UPLOAD_PROCESS", "0")
    monkeypatch.setenv("PHOENIX_S3_PART_MB", "5")
    ep = s3_bucket.endpoint
    return open_storage(f"{s3_bucket.uri}/job/train", Credentials(
        endpoint_url=ep.url, access_key=ep.access_key, secret_key=ep.secret_key))


def sharded_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"big": torch.randn(3 * MiB, generator=g),  # 12 MiB
                      "small": torch.randn(100, generator=g, dtype=torch.float64),
                      "ids": torch.arange(1000)},
            "optim": {"m": torch.randn(MiB, generator=g), "step": torch.tensor(7.0),
                      "param_groups": [{"lr": 0.003, "betas": (0.9, 0.99)}]}}


def zeros_like(state: dict) -> dict:
    def z(v):
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        if isinstance(v, dict):
            return {k: z(x) for k, x in v.items()}
        return None if not isinstance(v, list) else [z(x) for x in v]
    return z(state)


def save(storage, step: int, state: dict, retry: RetryPolicy | None = None, local=None):
    """What a gang's commit does on one rank: stage, DCP-save through the writer, manifest."""
    staged = Staging().stage(state)
    writer = StorageWriter(storage, step, retry=retry, block_size=BLOCK, local=local)
    dcp_storage.save(staged.state, writer, no_dist=True)
    return publish_manifest(storage, step, writer.entries, epoch=0, phase="train",
                            config_fingerprint="fp")


class Ranges:
    """Every ``read_into`` the storage serves: (key, offset, length)."""

    def __init__(self, storage) -> None:
        self.seen: list[tuple[str, int, int]] = []
        self._lock, real = threading.Lock(), storage.read_into

        def read_into(key, offset, view):
            with self._lock:
                self.seen.append((key, offset, len(memoryview(view))))
            return real(key, offset, view)

        storage.read_into = read_into

    def bytes(self) -> int:
        return sum(n for _, _, n in self.seen)


def test_dcp_streams_to_s3_spooling_nothing_and_loads_bit_exact(storage, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    state = sharded_state(1)
    info = save(storage, 10, state)
    assert os.listdir(tmp) == []  # nothing staged on local disk
    files = info.manifest.files
    assert set(files) == {"dcp-__0_0.distcp", "dcp-.metadata", "dcp-.blocks.json"}
    assert files["dcp-__0_0.distcp"].stored_checksum.endswith("-4")  # 16 MiB in 5 MiB parts
    assert verify_checkpoint(storage, 10, deep=True).valid
    assert vouch_files(storage, info, 0, 1) == 0  # the store's checksums: HEADs, no bytes

    target = zeros_like(state)
    dcp.load(target, storage_reader=StorageReader(storage, latest_valid_checkpoint(storage)),
             no_dist=True)
    for part in ("model", "optim"):
        for k, v in state[part].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(target[part][k], v) and target[part][k].dtype == v.dtype, k
    assert target["optim"]["param_groups"] == [{"lr": 0.003, "betas": (0.9, 0.99)}]


def test_a_restore_reads_only_the_blocks_its_plan_needs(storage):
    state = sharded_state(2)
    info = save(storage, 10, state)
    ranges = Ranges(storage)
    target = {"optim": {"m": torch.zeros(MiB)}}  # 4 MiB of the 16 MiB object
    reader = StorageReader(storage, info, ReadConfig(part_size=64 << 10, concurrency=4))
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert torch.equal(target["optim"]["m"], state["optim"]["m"])
    shard = f"{step_dir_name(10)}/dcp-__0_0.distcp"
    read = sum(n for key, _, n in ranges.seen if key == shard)
    # The item's bytes (a torch.save record: 4 MiB and a header), rounded out to blocks.
    assert 4 * MiB < read <= 4 * MiB + 3 * BLOCK, read
    assert all(n <= 64 << 10 for key, _, n in ranges.seen if key == shard)  # ranged, in parts
    meta = sum(info.manifest.files[n].size for n in ("dcp-.metadata", "dcp-.blocks.json"))
    assert reader.bytes_read == read + meta
    assert info.manifest.files["dcp-__0_0.distcp"].size > 16 * MiB


def test_a_damaged_block_is_refused_by_its_checksum_and_by_the_restores_check(storage, s3_bucket):
    state = sharded_state(3)
    info = save(storage, 10, state)
    c, key = s3_bucket.client(), f"job/train/{step_dir_name(10)}/dcp-__0_0.distcp"
    body = bytearray(c.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read())
    body[5 * MiB] ^= 0x10  # inside "big", same size
    c.put_object(Bucket=s3_bucket.name, Key=key, Body=bytes(body), ChecksumAlgorithm="SHA256")

    with pytest.raises(CorruptCheckpointError, match="not the object that was uploaded"):
        vouch_files(storage, info, 0, 1)  # before any rank commits to it
    target = zeros_like(state)
    with pytest.raises(CorruptCheckpointError, match="do not match their checksum"):
        dcp_storage.load(target, StorageReader(storage, info), no_dist=True)  # read anyway


def test_a_dcp_save_torn_midway_leaves_no_manifest_and_is_never_resumed(storage_here):
    storage = storage_here
    save(storage, 10, sharded_state(4))
    real, parts = storage.client.upload_part, {"n": 0}

    def flaky_upload_part(**kw):
        parts["n"] += 1
        if parts["n"] > 2:  # the 16 MiB object has 4 parts: it fails midway, for good
            from botocore.exceptions import EndpointConnectionError
            raise EndpointConnectionError(endpoint_url="http://s3.invalid")
        return real(**kw)

    storage.client.upload_part = flaky_upload_part
    sleeps: list[float] = []
    with pytest.raises(StorageError, match="upload part of .*dcp-__0_0.distcp"):
        save(storage, 20, sharded_state(5), retry=RetryPolicy(attempts=2, sleep=sleeps.append))
    storage.client.upload_part = real
    assert len(sleeps) == 1  # streamed again once, from the staged snapshot
    d = step_dir_name(20)
    assert storage.size(f"{d}/{MANIFEST_NAME}") is None
    assert storage.list_keys(d) == []  # the multipart upload was aborted: nothing visible
    assert storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", []) == []
    assert latest_valid_checkpoint(storage, deep=True).step == 10

    # Every object written but the manifest (a commit that died before it): not a checkpoint.
    staged = Staging().stage(sharded_state(5))
    writer = StorageWriter(storage, 30)
    dcp.save(staged.state, storage_writer=writer, no_dist=True)
    assert len(storage.list_keys(step_dir_name(30))) == 3
    assert not verify_checkpoint(storage, 30).valid
    assert latest_valid_checkpoint(storage, deep=True).step == 10


def loaded_equal(target: dict, state: dict) -> bool:
    return all(torch.equal(target[p][k], v) for p in ("model", "optim")
               for k, v in state[p].items() if isinstance(v, torch.Tensor))


def test_a_rank_rereads_its_own_shard_from_its_pods_copy_and_storage_decides(storage_here,
                                                                            tmp_path):
    """shard_cache.py: the copy kept while the object streamed serves the restore (0 bytes
    of the shard from storage); a copy of other content is never taken for it; a damaged
    block of the copy is read from storage instead; a failed upload keeps no copy; the two
    newest copies stay."""
    storage = storage_here
    local = ShardCache(tmp_path / "peer", local_rank=0)
    state = sharded_state(6)
    info = save(storage, 10, state, local=local)
    entry = info.manifest.files["dcp-__0_0.distcp"]
    copy = local.find(entry.sha256, entry.size)
    assert copy is not None and copy.read_bytes() == storage.get_bytes(
        f"{step_dir_name(10)}/dcp-__0_0.distcp")

    ranges = Ranges(storage)
    target = zeros_like(state)
    reader = StorageReader(storage, info, local=local)
    dcp_storage.load(target, reader, no_dist=True)
    assert loaded_equal(target, state)
    shard = f"{step_dir_name(10)}/dcp-__0_0.distcp"
    assert [k for k, _, _ in ranges.seen if k == shard] == []  # nothing of it from storage
    assert reader.local_bytes >= entry.size - BLOCK and reader.bytes_read < 64 << 10  # metadata

    # A damaged copy: the damaged block comes from storage, the rest from the copy.
    body = bytearray(copy.read_bytes())
    body[5 * MiB] ^= 0x10
    copy.write_bytes(bytes(body))
    ranges.seen.clear()
    target = zeros_like(state)
    reader = StorageReader(storage, info, local=local)
    dcp_storage.load(target, reader, no_dist=True)
    assert loaded_equal(target, state)
    assert [(o, n) for k, o, n in ranges.seen if k == shard] == [(5 * MiB // BLOCK * BLOCK, BLOCK)]

    # Another save at the same step with other content: found by content, never mixed up.
    other = sharded_state(7)
    info2 = save(storage, 10, other, local=local)
    e2 = info2.manifest.files["dcp-__0_0.distcp"]
    assert e2.sha256 != entry.sha256 and local.find(e2.sha256, e2.size) is not None
    target = zeros_like(other)
    dcp_storage.load(target, StorageReader(storage, info2, local=local), no_dist=True)
    assert loaded_equal(target, other)

    # A third: the oldest copy goes (two kept); a failed upload leaves no partial copy.
    save(storage, 20, sharded_state(8), local=local)
    assert local.find(entry.sha256, entry.size) is None
    assert len(list(local.mine.iterdir())) == 2
    real = storage.client.upload_part

    def failing(**kw):
        from botocore.exceptions import EndpointConnectionError
        raise EndpointConnectionError(endpoint_url="http://s3.invalid")

    storage.client.upload_part = failing
    with pytest.raises(StorageError):
        save(storage, 30, sharded_state(9), retry=RetryPolicy(attempts=1), local=local)
    storage.client.upload_part = real
    assert sorted(p.name.startswith(".") for p in local.mine.iterdir()) == [False, False]
