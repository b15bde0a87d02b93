"""The checkpoint spool under a read-only root filesystem: the image's PHOENIX_SPOOL_DIR is
hidden by the emptyDir mounted at /tmp, so the runtime creates it, and says which setting
to fix when it cannot."""
from __future__ import annotations

import os

import pytest

from phoenix_trainer.checkpoint import AsyncCheckpointer, make_spool
from phoenix_trainer.core.contract import ENV_SPOOL_DIR
from phoenix_trainer.core.errors import CheckpointError
from phoenix_trainer.core.storage.file import LocalStorage

pytestmark = pytest.mark.unit


def test_missing_spool_dir_from_the_environment_is_created(tmp_path, monkeypatch):
    # what a pod sees: /tmp is a fresh emptyDir, the image's /tmp/phoenix-spool is gone
    spool_root = tmp_path / "emptydir" / "phoenix-spool"
    monkeypatch.setenv(ENV_SPOOL_DIR, str(spool_root))
    ck = AsyncCheckpointer(LocalStorage(tmp_path / "ckpt"), phase="train", config_fingerprint="fp")
    try:
        assert os.path.dirname(ck.spool) == str(spool_root) and os.path.isdir(ck.spool)
    finally:
        ck.close()
    assert not os.path.exists(ck.spool) and spool_root.is_dir()


def test_existing_spool_dir_is_reused_and_each_process_gets_its_own(tmp_path):
    a, b = make_spool(str(tmp_path)), make_spool(str(tmp_path))
    assert a != b and os.path.dirname(a) == os.path.dirname(b) == str(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_unwritable_spool_dir_names_the_setting(tmp_path, monkeypatch):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    monkeypatch.setenv(ENV_SPOOL_DIR, str(readonly / "phoenix-spool"))
    try:
        with pytest.raises(CheckpointError, match=ENV_SPOOL_DIR) as err:
            make_spool()
    finally:
        readonly.chmod(0o755)
    assert str(readonly / "phoenix-spool") in str(err.value)
    assert isinstance(err.value.__cause__, OSError)


def test_spool_under_a_file_names_the_setting(tmp_path, monkeypatch):
    # not writable even for root: the parent is a regular file (ENOTDIR)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(ENV_SPOOL_DIR, str(blocker / "phoenix-spool"))
    with pytest.raises(CheckpointError, match=f"{ENV_SPOOL_DIR}=.*writable directory"):
        AsyncCheckpointer(LocalStorage(tmp_path / "ckpt"), phase="train", config_fingerprint="fp")
