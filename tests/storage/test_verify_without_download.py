"""Deep verification costs one HEAD per shard, not a download: the manifest keeps the SHA256
checksum the S3 server recorded (and checked) at upload, and a reader compares it with what
the server reports now. Against the real S3 server (versitygw)."""
from __future__ import annotations

import pytest

from phoenix_trainer.core.layout import Manifest, step_dir_name, verify_checkpoint
from phoenix_trainer.core.storage import Credentials, open_storage
from phoenix_trainer.core.writer import commit_checkpoint

pytestmark = pytest.mark.storage
MB = 1 << 20


def storage_for(bucket):
    ep = bucket.endpoint
    return open_storage(f"{bucket.uri}/job/train", Credentials(
        endpoint_url=ep.url, access_key=ep.access_key, secret_key=ep.secret_key))


class Calls:
    """Counts the S3 operations a storage's client makes."""

    def __init__(self, storage) -> None:
        self.ops: list[str] = []
        storage.client.meta.events.register("before-call.s3",
                                             lambda model, **kw: self.ops.append(model.name))


@pytest.fixture
def committed(s3_bucket, tmp_path):
    st = storage_for(s3_bucket)
    big = tmp_path / "model.pt"
    big.write_bytes(bytes(range(256)) * (80 * 1024 + 7))  # ~20 MiB: a multipart upload
    small = tmp_path / "trainer.json"
    small.write_bytes(b'{"step": 10}')
    commit_checkpoint(st, 10, {"model.pt": big, "trainer.json": small}, epoch=0, phase="train",
                      config_fingerprint="fp")
    return st


def test_manifest_keeps_the_checksums_s3_recorded(committed):
    m = Manifest.from_json(committed.get_bytes(f"{step_dir_name(10)}/manifest.json"))
    assert m.files["model.pt"].stored_checksum.endswith("-2")  # composite of two parts
    assert "-" not in m.files["trainer.json"].stored_checksum  # single PUT: full-object sha256


def test_deep_verification_downloads_nothing(committed):
    calls = Calls(committed)
    info = verify_checkpoint(committed, 10, deep=True)
    assert info.valid, info.reason
    assert calls.ops.count("GetObject") == 1  # the manifest; no shard
    assert calls.ops.count("HeadObject") == 2


def test_a_same_size_replacement_is_caught_without_download(committed, tmp_path):
    """Say a superseded attempt overwrote a shard with its own bytes of the same size: the
    sizes agree, the stored checksum does not."""
    d = step_dir_name(10)
    committed.put_bytes(f"{d}/trainer.json", b'{"step": 11}')
    calls = Calls(committed)
    info = verify_checkpoint(committed, 10, deep=True)
    assert not info.valid and "not the object that was uploaded" in info.reason
    assert "GetObject" not in calls.ops[1:]
