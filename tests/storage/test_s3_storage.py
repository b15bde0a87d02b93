"""The S3 backend against the real local S3 server (versitygw)."""
from __future__ import annotations

import hashlib

import pytest

from phoenix_trainer.core.errors import StorageError
from phoenix_trainer.core.layout import (
    MANIFEST_NAME, latest_valid_checkpoint, list_checkpoints, verify_checkpoint,
)
from phoenix_trainer.core.storage import Credentials, open_storage
from phoenix_trainer.core.storage.s3 import S3Storage
from phoenix_trainer.core.writer import RetryPolicy, apply_retention, commit_checkpoint

pytestmark = pytest.mark.storage


def storage_for(bucket, prefix="job/train"):
    ep = bucket.endpoint
    return open_storage(f"{bucket.uri}/{prefix}", Credentials(
        endpoint_url=ep.url, access_key=ep.access_key, secret_key=ep.secret_key))


def test_s3_round_trip_multipart_and_listing(s3_bucket, tmp_path):
    st = storage_for(s3_bucket)
    assert isinstance(st, S3Storage) and st.uri == f"{s3_bucket.uri}/job/train"
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (80 * 1024 + 7))  # ~20 MiB: crosses the multipart threshold
    small = tmp_path / "small.bin"
    small.write_bytes(b"hello")
    for step in (5, 10):
        commit_checkpoint(st, step, {"model.pt": big, "trainer.json": small}, epoch=0,
                          phase="train", config_fingerprint="fp")
    infos = list_checkpoints(st)
    assert [(i.step, i.valid) for i in infos] == [(5, True), (10, True)]
    assert verify_checkpoint(st, 10, deep=True).valid
    out = tmp_path / "back.bin"
    st.get_file("step-0000000010/model.pt", out)
    assert out.read_bytes() == big.read_bytes()
    assert st.size("step-0000000010/nope") is None
    with pytest.raises(FileNotFoundError):
        st.get_bytes("step-0000000010/nope")
    # Read and hashed chunk by chunk (20 MiB: three chunks): the same bytes, their sha256.
    data, digest = st.get_bytes_sha256("step-0000000010/model.pt")
    assert data == big.read_bytes() and digest == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        st.get_bytes_sha256("step-0000000010/nope")


def test_s3_corruption_detected_and_fallback(s3_bucket, tmp_path):
    st = storage_for(s3_bucket)
    f = tmp_path / "m.pt"
    f.write_bytes(b"a" * 1000)
    for step in (1, 2, 3):
        commit_checkpoint(st, step, {"model.pt": f}, epoch=0, phase="train", config_fingerprint="fp")
    c = s3_bucket.client()
    key = "job/train/step-0000000003/model.pt"
    c.put_object(Bucket=s3_bucket.name, Key=key, Body=b"b" * 1000)  # same size, wrong bytes
    assert verify_checkpoint(st, 3, deep=False).valid
    assert "sha256 mismatch" in verify_checkpoint(st, 3, deep=True).reason
    c.put_object(Bucket=s3_bucket.name, Key="job/train/step-0000000002/model.pt", Body=b"a" * 10)
    assert latest_valid_checkpoint(st).step == 1
    c.delete_object(Bucket=s3_bucket.name, Key=f"job/train/step-0000000001/{MANIFEST_NAME}")
    assert latest_valid_checkpoint(st) is None
    commit_checkpoint(st, 4, {"model.pt": f}, epoch=0, phase="train", config_fingerprint="fp")
    commit_checkpoint(st, 5, {"model.pt": f}, epoch=0, phase="train", config_fingerprint="fp")
    assert apply_retention(st, keep=2) == [1, 2, 3]
    assert [i.step for i in list_checkpoints(st)] == [4, 5]


def test_s3_unreachable_is_a_storage_error(tmp_path):
    st = open_storage("s3://nobucket/x", Credentials(endpoint_url="http://127.0.0.1:9",
                                                     access_key="a", secret_key="b"))
    f = tmp_path / "f"
    f.write_bytes(b"1")
    sleeps = []
    with pytest.raises(StorageError, match="reachable|failed"):
        RetryPolicy(attempts=3, sleep=sleeps.append).run("upload", lambda: st.put_file("k", f))
    assert len(sleeps) == 2


# --- issue 29: how the client reaches the server --------------------------------------------
def test_the_trainers_env_without_a_session_token_or_style_reaches_a_custom_endpoint(
        s3_bucket, s3_env, monkeypatch):
    """What a trainer pod gets from a Secret with only the key pair and a job that leaves
    addressingStyle at auto: AWS_* env, no AWS_SESSION_TOKEN, no PHOENIX_S3_ADDRESSING_STYLE.
    The client must go path-style (the server has no per-bucket host names) and unsigned by
    any token."""
    from phoenix_trainer.core.contract import ENV_S3_ADDRESSING_STYLE

    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv(ENV_S3_ADDRESSING_STYLE, raising=False)
    st = open_storage(f"{s3_bucket.uri}/env/train")
    assert st.client.meta.config.s3["addressing_style"] == "path"
    st.put_bytes("a.txt", b"via env")
    assert st.get_bytes("a.txt") == b"via env"
    assert st.list_keys("") == ["a.txt"]


def test_operator_credentials_with_an_explicit_path_style_round_trip(s3_bucket):
    """The operator's client as ``Gather.storage_access`` builds it: the job's keys, no
    token (a Secret without AWS_SESSION_TOKEN), the style resolved for the job's endpoint."""
    from phoenix_trainer.core.contract import s3_addressing_style

    ep = s3_bucket.endpoint
    for requested in ("auto", "path"):
        creds = Credentials(endpoint_url=ep.url, access_key=ep.access_key,
                            secret_key=ep.secret_key, session_token=None,
                            addressing_style=s3_addressing_style(requested, ep.url))
        st = open_storage(f"{s3_bucket.uri}/{requested}/train", creds)
        assert st.client.meta.config.s3["addressing_style"] == "path"
        st.put_bytes("b.txt", requested.encode())
        assert st.get_bytes("b.txt") == requested.encode()
        assert st.stat("b.txt")[0] == len(requested)


def test_a_deleted_prefix_is_no_longer_listed_as_a_directory(s3_bucket):
    """S3 has no directories; stores built on a filer (SeaweedFS) keep one whose objects are
    gone and list it, which made a deleted step an "incomplete checkpoint" forever."""
    st = storage_for(s3_bucket)
    for key in ("step-1/a.bin", "step-1/model/deep/shard.bin", "step-2/a.bin"):
        st.put_bytes(key, b"x")
    st.delete_prefix("step-1")
    assert st.list_dirs("") == ["step-2"]
    assert st.list_keys("") == ["step-2/a.bin"]
    assert st.get_bytes("step-2/a.bin") == b"x"
