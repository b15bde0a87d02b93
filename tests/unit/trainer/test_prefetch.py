"""The start-up prefetch (prefetch.py): which process prefetches, how much memory it may
take, and a resume that takes the prefetched shards - verified as ever, downloaded once -
on local-file storage, in-process."""
from __future__ import annotations

import hashlib
import logging

import pytest

from phoenix_trainer import prefetch
from phoenix_trainer.core.contract import ENV_RESUME_FROM, ENV_ROLE
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.testing import state_dicts_equal

from test_session import loop, ref_model, session  # noqa: F401 - fixture reused

pytestmark = pytest.mark.unit
URI = "s3://b/run/train/step-0000000005"


@pytest.mark.parametrize("environ,argv,pid,expected", [
    ({ENV_RESUME_FROM: URI}, ["/app/train.py"], 1, URI),  # the trainer: PID 1, a script
    ({}, ["/app/train.py"], 1, None),  # nothing to resume from
    ({ENV_RESUME_FROM: URI}, ["/app/train.py"], 7, None),  # a child of the trainer
    ({ENV_RESUME_FROM: URI}, ["-c"], 1, None),  # python -c, multiprocessing's spawn
    ({ENV_RESUME_FROM: URI}, ["/opt/venv/bin/torchrun"], 1, None),  # a torchrun agent
    ({ENV_RESUME_FROM: URI, "WORLD_SIZE": "4"}, ["/app/train.py"], 1, None),  # a gang rank
    ({ENV_RESUME_FROM: URI, "PET_NNODES": "2"}, ["/app/train.py"], 1, None),  # a gang member
    ({ENV_RESUME_FROM: URI, ENV_ROLE: "standby"}, ["/app/train.py"], 1, None),  # preloads itself
    ({ENV_RESUME_FROM: URI, "PHOENIX_PREFETCH": "0"}, ["/app/train.py"], 1, None),  # off
    ({ENV_RESUME_FROM: URI, "PHOENIX_PREFETCH": "1"}, ["-c"], 7, URI),  # forced
])
def test_only_the_trainer_process_prefetches(environ, argv, pid, expected):
    assert prefetch.wanted(environ, argv, pid, cpus=8) == expected


def test_auto_needs_cpus_to_spare_forced_does_not():
    trainer = {ENV_RESUME_FROM: URI}
    assert prefetch.wanted(trainer, ["/app/train.py"], 1, cpus=1) is None
    assert prefetch.wanted(trainer, ["/app/train.py"], 1, cpus=1.5) is None
    assert prefetch.wanted(trainer, ["/app/train.py"], 1, cpus=2) == URI
    assert prefetch.wanted({**trainer, "PHOENIX_PREFETCH": "1"}, ["/app/train.py"], 1, cpus=1) == URI


def test_usable_cpus_honours_the_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert prefetch.usable_cpus(tmp_path) >= 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert prefetch.usable_cpus(tmp_path) == min(1.5, prefetch.usable_cpus(tmp_path / "none"))


@pytest.fixture
def preempted(tmp_path):
    """A run stopped at step 5 (its emergency checkpoint); the checkpoint's URI."""
    with session(tmp_path) as s:
        result, _ = loop(s, stop_at=5)
    assert result.checkpoint.endswith("step-0000000005")
    yield result.checkpoint
    prefetch.release()


def counting_gets(monkeypatch) -> list[str]:
    """Record every shard this process reads from local storage (manifests aside)."""
    gets: list[str] = []
    real = LocalStorage.get_bytes

    def get_bytes(self, key):
        if not key.endswith("manifest.json"):
            gets.append(key)
        return real(self, key)

    def read_into(self, key, offset, view):  # the restore's ranged reads
        gets.append(key)
        return real_range(self, key, offset, view)

    real_range = LocalStorage.read_into
    monkeypatch.setattr(LocalStorage, "get_bytes", get_bytes)
    monkeypatch.setattr(LocalStorage, "read_into", read_into)
    return gets


def resume(tmp_path, uri):
    with session(tmp_path, env={"resume_from": uri}) as s:
        result, model = loop(s)
        start = next(r for r in s.metrics.records if r["event"] == "resume")
    return result, model, start["startup"]


def start(tmp_path, uri):
    return prefetch.start_from_env({ENV_RESUME_FROM: uri, "PHOENIX_PREFETCH": "1",
                                    "PHOENIX_SPOOL_DIR": str(tmp_path / "spool")})


def test_a_resume_takes_the_shards_the_child_fetched_and_reads_none_itself(
        tmp_path, preempted, ref_model, monkeypatch):
    gets = counting_gets(monkeypatch)
    pre = start(tmp_path, preempted)
    assert pre is not None and prefetch.current() is pre
    result, model, startup = resume(tmp_path, preempted)
    assert result.reason == "completed" and state_dicts_equal(model.state_dict(), ref_model)
    assert not [k for k in gets if "step-0000000005/" in k]  # all from the child's files
    assert startup["prefetch"]["bytes"] > 0 and startup["prefetch"]["seconds"] > 0
    assert "error" not in startup["prefetch"] and prefetch.current() is None
    assert not pre.folder.exists() and pre._proc.poll() is not None  # cleaned up


def test_started_once_per_process(tmp_path, preempted):
    """The .pth file may run twice in one interpreter: still one child, one folder."""
    first = start(tmp_path, preempted)
    assert start(tmp_path, preempted) is first and prefetch.current() is first


def test_a_prefetched_copy_that_does_not_match_is_downloaded_again(
        tmp_path, preempted, ref_model, caplog, monkeypatch):
    gets = counting_gets(monkeypatch)
    pre = start(tmp_path, preempted)
    assert pre.take(preempted, "data.json") is not None  # the child is running and reporting
    while pre._read_line():  # let it finish
        pass
    # A shard file that is not the stored shard (the child's own hash of it says so).
    zeros = b"\0" * (pre.folder / "model.pt").stat().st_size
    (pre.folder / "model.pt").write_bytes(zeros)
    pre._ready["model.pt"] = hashlib.sha256(zeros).hexdigest()
    with caplog.at_level(logging.WARNING, logger="phoenix"):
        result, model, startup = resume(tmp_path, preempted)
    # Resumed from step 5 all the same (never judged by the copy), bit-exact.
    assert result.reason == "completed" and state_dicts_equal(model.state_dict(), ref_model)
    assert any("prefetched shard model.pt does not match" in m for m in caplog.messages)
    assert "step-0000000005/model.pt" in gets  # read from the store (so the counter counts)


@pytest.mark.parametrize("how", ["missing", "no room"])
def test_no_prefetch_means_the_restore_downloads_as_before(tmp_path, preempted, ref_model, how,
                                                          monkeypatch):
    if how == "missing":
        pre = start(tmp_path, preempted.replace("-0000000005", "-0000000099"))
    else:  # the child sees a full disk (the same module, run by hand in this process)
        import io
        import shutil

        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1))
        out = io.StringIO()
        (tmp_path / "f").mkdir()
        prefetch._download(preempted, tmp_path / "f", out)
        assert "would not fit" in out.getvalue() and not list((tmp_path / "f").iterdir())
        return
    while pre._read_line():
        pass
    assert pre.error and not pre._ready
    result, model, startup = resume(tmp_path, preempted)
    assert result.reason == "completed" and state_dicts_equal(model.state_dict(), ref_model)
    assert startup["prefetch"]["error"] == pre.error
