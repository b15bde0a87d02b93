"""Layout, manifest validation and retention on the local-file backend (no torch)."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from phoenix_trainer.core import contract
from phoenix_trainer.core.errors import CorruptCheckpointError
from phoenix_trainer.core.layout import (
    MANIFEST_NAME, Manifest, latest_valid_checkpoint, list_checkpoints, parse_step_dir,
    split_checkpoint_uri, step_dir_name, verify_checkpoint,
)
from phoenix_trainer.core.storage import open_storage
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.core.writer import RetryPolicy, apply_retention, commit_checkpoint

pytestmark = pytest.mark.unit


def make_ckpt(storage, tmp_path, step, payload=b"x" * 100):
    files = {}
    for name in ("model.pt", "optimizer.pt"):
        p = tmp_path / f"{step}-{name}"
        p.write_bytes(payload + name.encode())
        files[name] = p
    return commit_checkpoint(storage, step, files, epoch=step // 10, phase="train",
                             config_fingerprint="abc", run_id="r1", attempt=0)


def test_step_dir_names_round_trip():
    assert step_dir_name(120) == "step-0000000120"
    assert parse_step_dir("step-0000000120") == 120
    assert parse_step_dir("step-12") is None
    assert split_checkpoint_uri("s3://b/p/train/step-0000000120/") == ("s3://b/p/train", 120)
    assert split_checkpoint_uri("s3://b/p/train") == ("s3://b/p/train", None)


def test_open_storage_schemes(tmp_path):
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    with pytest.raises(ValueError, match="unsupported"):
        open_storage("gs://x/y")
    with pytest.raises(ValueError, match="bucket"):
        open_storage("s3:///nobucket")


def test_layout_and_storage_do_not_import_torch():
    code = ("import sys; import phoenix_trainer, phoenix_trainer.core.storage, phoenix_trainer.core.layout,"
            " phoenix_trainer.core.contract, phoenix_trainer.core.writer,"
            " phoenix_trainer.attempt_log, phoenix_trainer.core.errors; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_core_module_imports_without_torch_and_nothing_outside_core():
    """``phoenix_trainer.core`` is what the operator image ships: each of its modules, imported
    alone, must load with torch unavailable and pull in no phoenix_trainer module outside
    ``core`` (the package's own lazy ``__init__`` aside)."""
    import pathlib

    import phoenix_trainer.core as core

    root = pathlib.Path(core.__file__).parent
    modules = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules.append(".".join(("phoenix_trainer.core",) + parts[:-1 if parts[-1] == "__init__" else None]))
    assert {"phoenix_trainer.core.handshake", "phoenix_trainer.core.storage.s3"} <= set(modules)
    for module in modules:
        code = ("import sys; sys.modules['torch'] = None; import importlib;"
                f" importlib.import_module({module!r});"
                " outside = sorted(m for m in sys.modules if m.startswith('phoenix_trainer.')"
                " and not m.startswith('phoenix_trainer.core'));"
                " assert not outside, outside; assert sys.modules['torch'] is None")
        subprocess.run([sys.executable, "-c", code], check=True)


def test_manifest_written_last_and_valid(tmp_path):
    st = LocalStorage(tmp_path / "ckpt")
    info = make_ckpt(st, tmp_path, 10)
    assert info.valid and info.uri.endswith("step-0000000010")
    m = json.loads((tmp_path / "ckpt" / "step-0000000010" / MANIFEST_NAME).read_text())
    assert m["formatVersion"] == 1 and m["step"] == 10 and m["configFingerprint"] == "abc"
    assert set(m["files"]) == {"model.pt", "optimizer.pt"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert verify_checkpoint(st, 10, deep=True).valid


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "truncated"), ("missing_manifest", "manifest.json is missing"),
    ("corrupt_manifest", "corrupt manifest"), ("bitflip", "sha256 mismatch"),
    ("missing_shard", "missing"),
])
def test_damage_is_detected_and_latest_falls_back(tmp_path, damage, reason, caplog):
    st = LocalStorage(tmp_path / "ckpt")
    make_ckpt(st, tmp_path, 10)
    make_ckpt(st, tmp_path, 20)
    d = tmp_path / "ckpt" / "step-0000000020"
    if damage == "truncate":
        (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:50])
    elif damage == "missing_manifest":
        (d / MANIFEST_NAME).unlink()
    elif damage == "corrupt_manifest":
        (d / MANIFEST_NAME).write_text('{"format": "phoenix-checkpoint", "formatVer')
    elif damage == "bitflip":
        data = bytearray((d / "model.pt").read_bytes())
        data[3] ^= 0xFF
        (d / "model.pt").write_bytes(bytes(data))
    elif damage == "missing_shard":
        (d / "optimizer.pt").unlink()
    info = verify_checkpoint(st, 20, deep=True)
    assert not info.valid and reason in info.reason
    if damage != "bitflip":  # sizes and manifest are enough to see these
        assert not verify_checkpoint(st, 20, deep=False).valid
    latest = latest_valid_checkpoint(st, deep=True)
    assert latest is not None and latest.step == 10
    assert "step-0000000020" in caplog.text and "falling back" in caplog.text


def test_manifest_rejects_unknown_version_and_bad_names():
    good = Manifest(1, 0, "train", "t", "fp", {"a.pt": __import__("phoenix_trainer.core.storage").core.storage.FileEntry(1, "0" * 64)})
    data = json.loads(good.to_json())
    Manifest.from_json(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match="formatVersion"):
        Manifest.from_json(json.dumps({**data, "formatVersion": 99}))
    with pytest.raises(CorruptCheckpointError, match="illegal file name"):
        Manifest.from_json(json.dumps({**data, "files": {"../x": {"size": 1, "sha256": "0" * 64}}}))


def test_manifest_keeps_a_multipart_shards_part_size_and_reads_one_without_it():
    from phoenix_trainer.core.storage import FileEntry

    entries = {"a.pt": FileEntry(25, "0" * 64, "Zm9v-3", part_size=10), "b.json": FileEntry(2, "1" * 64)}
    text = Manifest(1, 0, "train", "t", "fp", entries).to_json()
    assert '"partSize": 10' in text and text.count("partSize") == 1
    back = Manifest.from_json(text).files
    assert back == entries and back["a.pt"].restore_check() == (10, "Zm9v-3")
    data = json.loads(text)
    del data["files"]["a.pt"]["partSize"]  # written before the field existed: the whole sha256
    assert Manifest.from_json(json.dumps(data)).files["a.pt"].restore_check() == (None, "0" * 64)


def test_retention_keeps_k_and_protected(tmp_path):
    st = LocalStorage(tmp_path / "ckpt")
    for s in (10, 20, 30, 40, 50):
        make_ckpt(st, tmp_path, s)
    (tmp_path / "ckpt" / "step-0000000015").mkdir()  # stale partial, older than newest
    (tmp_path / "ckpt" / "step-0000000060").mkdir()  # maybe in flight: untouched
    deleted = apply_retention(st, keep=2, protect={20})
    assert deleted == [10, 15, 30]
    assert [i.step for i in list_checkpoints(st)] == [20, 40, 50, 60]
    with pytest.raises(Exception, match="keep >= 2"):
        apply_retention(st, keep=1)


def test_retention_reads_only_the_steps_it_may_keep(tmp_path):
    """Newest first, and only until ``keep`` valid ones are found: what is older goes
    unread; steps the caller committed itself (``known_valid``) are not read back."""
    st = LocalStorage(tmp_path / "ckpt")
    for s in (10, 20, 30, 40, 50):
        make_ckpt(st, tmp_path, s)
    (tmp_path / "ckpt" / "step-0000000045").mkdir()  # a failed save between two good ones

    class Reads(LocalStorage):
        def __init__(self, root):
            super().__init__(root)
            self.read: list[str] = []

        def get_bytes(self, key):
            self.read.append(key.split("/")[0])
            return super().get_bytes(key)

        def stat(self, key):
            self.read.append(key.split("/")[0])
            return super().stat(key)

    reads = Reads(tmp_path / "ckpt")
    assert apply_retention(reads, keep=2) == [10, 20, 30, 45]
    assert set(reads.read) == {"step-0000000050", "step-0000000045", "step-0000000040"}
    make_ckpt(st, tmp_path, 60)
    reads.read.clear()
    assert apply_retention(reads, keep=2, known_valid={50, 60}) == [40]
    assert reads.read == []
    assert [i.step for i in list_checkpoints(st)] == [50, 60]


def test_retry_policy_backs_off_with_jitter():
    from phoenix_trainer.core.errors import StorageError
    sleeps = []
    policy = RetryPolicy(attempts=4, initial_seconds=1, max_seconds=3, sleep=sleeps.append,
                         rng=random.Random(0))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise StorageError("unreachable")
        return "ok"

    assert policy.run("upload", flaky) == "ok"
    assert len(sleeps) == 3
    assert 0.5 <= sleeps[0] <= 1 and 1 <= sleeps[1] <= 2 and 1.5 <= sleeps[2] <= 3
    with pytest.raises(StorageError):
        RetryPolicy(attempts=2, sleep=lambda s: None).run("x", lambda: (_ for _ in ()).throw(StorageError("no")))


def test_termination_message_round_trip(tmp_path):
    msg = contract.TerminationMessage("preempted", step=12, checkpoint="s3://b/p/step-0000000012",
                                      emergencySaveCompleted=True, message="m" * 10000)
    text = msg.to_json()
    assert len(text.encode()) <= contract.MAX_TERMINATION_MESSAGE_BYTES
    back = contract.TerminationMessage.from_json(text)
    assert back.reason == "preempted" and back.step == 12 and back.emergencySaveCompleted
    assert set(json.loads(text)) == {"reason", "step", "checkpoint", "emergencySaveCompleted", "message",
                                     "resumeExact", "resumeExactReason"}
    assert back.resumeExact is None  # the trainer did not say
    inexact = contract.TerminationMessage("completed", step=3, resumeExact=False,
                                          resumeExactReason="r" * 5000, message="m" * 5000)
    text = inexact.to_json()
    back = contract.TerminationMessage.from_json(text)
    assert len(text.encode()) <= contract.MAX_TERMINATION_MESSAGE_BYTES
    assert back.resumeExact is False and back.resumeExactReason.startswith("rrr")
    assert back.message.startswith("mmm")
    with pytest.raises(ValueError):
        contract.TerminationMessage("exploded")
    assert msg.write(str(tmp_path / "term")) and not msg.write(str(tmp_path / "no" / "dir" / "x"))


def test_trainer_env_parsing():
    env = contract.TrainerEnv.from_env({"PHOENIX_ATTEMPT": "3", "PHOENIX_CHECKPOINT_KEEP": "4",
                                        "PHOENIX_GRACE_SECONDS": "12.5", "PHOENIX_FORCE_RESUME": "1",
                                        "PHOENIX_PHASE": "finetune"})
    assert (env.attempt, env.checkpoint_keep, env.grace_seconds, env.force_resume, env.phase) == \
        (3, 4, 12.5, True, "finetune")
    assert contract.TrainerEnv.from_env({}).grace_seconds == 30.0
    with pytest.raises(ValueError, match="PHOENIX_CHECKPOINT_KEEP"):
        contract.TrainerEnv.from_env({"PHOENIX_CHECKPOINT_KEEP": "1"})
    with pytest.raises(ValueError, match="PHOENIX_ATTEMPT"):
        contract.TrainerEnv.from_env({"PHOENIX_ATTEMPT": "x"})
