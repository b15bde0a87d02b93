"""The start-up prefetch (prefetch.py): which process prefetches, how much memory it may
take, and a resume that takes the prefetched shards - verified as ever, downloaded once -
on local-file storage, in-process."""
from __future__ import annotations

import hashlib
import logging
import threading

import pytest

from phoenix_trainer import prefetch
from phoenix_trainer.contract import ENV_RESUME_FROM, ENV_ROLE
from phoenix_trainer.storage import LocalStorage
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
    assert prefetch.wanted(trainer, ["/app/train.py"], 1, cpus=2) is None
    assert prefetch.wanted(trainer, ["/app/train.py"], 1, cpus=4) == URI
    assert prefetch.wanted({**trainer, "PHOENIX_PREFETCH": "1"}, ["/app/train.py"], 1, cpus=1) == URI


def test_usable_cpus_honours_the_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert prefetch.usable_cpus(tmp_path) >= 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert prefetch.usable_cpus(tmp_path) == min(1.5, prefetch.usable_cpus(tmp_path / "none"))


def test_memory_budget_is_half_of_what_is_left(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    8000 kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    assert prefetch.memory_budget(cgroup, tmp_path / "meminfo") == 8000 * 1024 // 2
    (cgroup / "memory.max").write_text(str(3_000_000))
    (cgroup / "memory.current").write_text(str(1_000_000))
    assert prefetch.memory_budget(cgroup, tmp_path / "meminfo") == 1_000_000
    assert prefetch.memory_budget(tmp_path / "none", tmp_path / "none") is None


@pytest.fixture
def preempted(tmp_path):
    """A run stopped at step 5 (its emergency checkpoint); the checkpoint's URI."""
    with session(tmp_path) as s:
        result, _ = loop(s, stop_at=5)
    assert result.checkpoint.endswith("step-0000000005")
    yield result.checkpoint
    prefetch.release()


def counting_gets(monkeypatch) -> list[str]:
    """Record every shard read from local storage (manifests aside), from any thread."""
    gets: list[str] = []
    real = LocalStorage.get_bytes

    def get_bytes(self, key):
        if not key.endswith("manifest.json"):
            gets.append(key)
        return real(self, key)

    monkeypatch.setattr(LocalStorage, "get_bytes", get_bytes)
    return gets


def resume(tmp_path, uri):
    with session(tmp_path, env={"resume_from": uri}) as s:
        result, model = loop(s)
        start = next(r for r in s.metrics.records if r["event"] == "resume")
    return result, model, start["startup"]


def test_a_resume_takes_the_prefetched_shards_and_downloads_each_once(
        tmp_path, preempted, ref_model, monkeypatch):
    gets = counting_gets(monkeypatch)
    release = threading.Event()
    real = LocalStorage.get_bytes

    def slow_first_shard(self, key):  # arrives only once the restore waits: take() must wait
        if key.endswith("/data.json"):
            release.wait(10)
        return real(self, key)

    monkeypatch.setattr(LocalStorage, "get_bytes", slow_first_shard)
    pre = prefetch.start_from_env({ENV_RESUME_FROM: preempted, "PHOENIX_PREFETCH": "1"})
    assert pre is not None and prefetch.current() is pre
    threading.Timer(0.3, release.set).start()
    result, model, startup = resume(tmp_path, preempted)
    assert result.reason == "completed" and state_dicts_equal(model.state_dict(), ref_model)
    shards = [k for k in gets if "step-0000000005/" in k]
    assert sorted(shards) == sorted(set(shards)) and len(shards) >= 3  # each once: the prefetch's
    assert startup["prefetch"]["bytes"] > 0 and startup["prefetch"]["waited"] > 0.1
    assert "error" not in startup["prefetch"] and prefetch.current() is None


def test_a_prefetched_copy_that_does_not_match_is_downloaded_again(
        tmp_path, preempted, ref_model, caplog):
    pre = prefetch.start_from_env({ENV_RESUME_FROM: preempted, "PHOENIX_PREFETCH": "1"})
    pre._thread.join(10)
    # A copy that is not the stored shard (the prefetch's own hash of it says so).
    zeros = b"\0" * len(pre._shards["model.pt"][0])
    pre._shards["model.pt"] = (zeros, hashlib.sha256(zeros).hexdigest())
    with caplog.at_level(logging.WARNING, logger="phoenix"):
        result, model, startup = resume(tmp_path, preempted)
    # Resumed from step 5 all the same (never judged by the copy), bit-exact.
    assert result.reason == "completed" and state_dicts_equal(model.state_dict(), ref_model)
    assert any("prefetched shard model.pt does not match" in m for m in caplog.messages)


@pytest.mark.parametrize("how", ["missing", "too big"])
def test_no_prefetch_means_the_restore_downloads_as_before(tmp_path, preempted, ref_model, how):
    if how == "missing":
        pre = prefetch.start_from_env({ENV_RESUME_FROM: preempted.replace("-0000000005", "-0000000099"),
                                       "PHOENIX_PREFETCH": "1"})
    else:
        pre = prefetch.start_from_env({ENV_RESUME_FROM: preempted, "PHOENIX_PREFETCH": "1"})
        pre._thread.join(10)
        pre = prefetch._current = prefetch.Prefetch(preempted, memory_budget=100).start()
    pre._thread.join(10)
    assert pre.error and not pre._shards
    result, model, startup = resume(tmp_path, preempted)
    assert result.reason == "completed" and state_dicts_equal(model.state_dict(), ref_model)
    assert startup["prefetch"]["error"] == pre.error
