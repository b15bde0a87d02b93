"""The core's single doors: ``core.handshake`` as the one writer of fence.json/control.json,
``core.storage.open_storage`` as the one place a URI becomes storage (no torch)."""
from __future__ import annotations

import pytest

from phoenix_trainer.core.handshake import (
    CONTROL_NAME, Control, Fence, advance_fence, read_control, read_fence, write_control,
    write_fence,
)
from phoenix_trainer.core.storage import Credentials, open_storage
from phoenix_trainer.core.storage.file import LocalStorage

pytestmark = pytest.mark.unit


def test_write_fence_overwrites_and_clears_control_on_request(tmp_path):
    storage = LocalStorage(tmp_path)
    write_control(storage, Control(1, checkpoint_now="n1"))
    assert write_fence(storage, Fence(3, "p-3", "t")).endswith("/fence.json")
    assert read_control(storage) == Control(1, checkpoint_now="n1")
    write_fence(storage, Fence(2, "p-2", "t"), clear_control=True)  # the operator's word goes
    assert read_fence(storage) == Fence(2, "p-2", "t")
    assert storage.size(CONTROL_NAME) is None


def test_advance_fence_never_moves_the_fence_back(tmp_path):
    storage = LocalStorage(tmp_path)
    assert advance_fence(storage, Fence(2, "p-2", "t", resume_from="r2"))  # no fence yet
    assert not advance_fence(storage, Fence(2, "p-2b", "t"))  # same attempt: kept
    assert not advance_fence(storage, Fence(1, "p-1", "t"))  # older: kept
    assert read_fence(storage) == Fence(2, "p-2", "t", resume_from="r2")
    assert advance_fence(storage, Fence(3, "p-3", "t"))
    assert read_fence(storage).attempt == 3


def test_open_storage_takes_the_bucket_root_from_the_caller(tmp_path):
    asked = []

    def bucket_root(uri, credentials):
        asked.append((uri, credentials))
        return LocalStorage(tmp_path)

    creds = Credentials(endpoint_url="http://s3", access_key="ak", secret_key="sk")
    st = open_storage("s3://bkt/a%20b/train/", creds, bucket_root=bucket_root)
    assert st.uri == f"file://{tmp_path}/a b/train"
    assert open_storage("s3://bkt", creds, bucket_root=bucket_root).uri == f"file://{tmp_path}"
    assert asked == [("s3://bkt", creds)] * 2


def test_credentials_keep_secrets_out_of_their_repr():
    text = repr(Credentials(endpoint_url="http://s3", access_key="AKIA-x", secret_key="s3cr3t"))
    assert "http://s3" in text and "AKIA-x" not in text and "s3cr3t" not in text
