"""AsyncCheckpointer: background upload, retries with backoff, in-flight bound, no half-valid dirs."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from phoenix_trainer.checkpoint import AsyncCheckpointer, Snapshot, load_checkpoint
from phoenix_trainer.core.errors import CheckpointError, StorageError
from phoenix_trainer.core.layout import latest_valid_checkpoint, list_checkpoints
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.core.writer import RetryPolicy

pytestmark = pytest.mark.unit


class FlakyStorage(LocalStorage):
    """Local storage whose uploads fail ``failures`` times (S3 unreachable), or stall."""

    def __init__(self, root, failures=0, delay=0.0, gate: threading.Event | None = None):
        super().__init__(root)
        self.failures, self.delay, self.gate, self.puts = failures, delay, gate, 0

    def _upload(self, key):
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        self.puts += 1
        if self.failures:
            self.failures -= 1
            raise StorageError(f"could not connect to the endpoint URL for {key}")

    def put_file(self, key, path):
        self._upload(key)
        super().put_file(key, path)

    def open_write(self, key, size_hint=None):  # shards stream from the snapshot
        self._upload(key)
        return super().open_write(key, size_hint)


def snap(step, value=1.0):
    return Snapshot.take(step, 0, {"model.pt": {"w": torch.full((64, 64), value)}},
                         {"trainer.json": {"step": step}})


def make(storage, **kw):
    sleeps = []
    kw.setdefault("retry", RetryPolicy(attempts=4, initial_seconds=0.5, sleep=sleeps.append))
    return AsyncCheckpointer(storage, phase="train", config_fingerprint="fp", **kw), sleeps


def test_save_round_trip_and_snapshot_is_a_copy(tmp_path):
    ck, _ = make(LocalStorage(tmp_path))
    w = torch.ones(4)
    s = Snapshot.take(5, 1, {"model.pt": {"w": w}}, {"trainer.json": {"step": 5}})
    w.add_(1)  # training goes on mutating the live tensor
    ck.save(s).result()
    info = latest_valid_checkpoint(ck.storage)
    assert info.step == 5 and info.manifest.epoch == 1
    shards = load_checkpoint(ck.storage, info)
    assert torch.equal(shards["model.pt"]["w"], torch.ones(4)) and shards["trainer.json"] == {"step": 5}
    ck.close()


def test_unreachable_storage_is_retried_with_backoff(tmp_path):
    st = FlakyStorage(tmp_path, failures=2)
    ck, sleeps = make(st)
    ck.save(snap(3)).result()
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.9
    assert latest_valid_checkpoint(st).step == 3 and ck.stats.saves == 1
    ck.close()


def test_failed_save_leaves_no_valid_checkpoint_and_training_goes_on(tmp_path):
    st = FlakyStorage(tmp_path)
    ck, _ = make(st)
    ck.save(snap(1)).result()
    st.failures = 100
    fut = ck.save(snap(2))
    with pytest.raises(StorageError):
        fut.result()
    assert ck.stats.failures == 1 and latest_valid_checkpoint(st).step == 1
    assert [(i.step, i.valid) for i in list_checkpoints(st)] in ([(1, True)], [(1, True), (2, False)])
    ck.close()


def test_in_flight_bound_blocks_only_when_exceeded(tmp_path):
    gate = threading.Event()
    st = FlakyStorage(tmp_path, gate=gate)
    ck, _ = make(st, max_in_flight=1)
    t0 = time.perf_counter()
    ck.save(snap(1))
    assert time.perf_counter() - t0 < 0.5  # did not wait for the stalled upload
    threading.Timer(0.3, gate.set).start()
    ck.save(snap(2))  # must wait until the first finishes
    assert ck.stats.wait_seconds >= 0.2
    assert ck.wait(10)
    assert [i.step for i in list_checkpoints(st) if i.valid] == [1, 2]
    ck.close()


def test_estimate_uses_measured_saves(tmp_path):
    ck, _ = make(LocalStorage(tmp_path))
    cold = ck.estimate_save_seconds(100_000_000)
    assert cold >= 2.0  # conservative before anything was measured
    ck.save(snap(1)).result()
    assert ck.estimate_save_seconds(snap(1).nbytes) < cold
    ck.close()


class PriorityProbe(LocalStorage):
    """Records the nice value of the thread that writes each shard, and of a thread that
    thread starts (an S3 upload's part threads)."""

    def __init__(self, root):
        super().__init__(root)
        self.nice: list[tuple[int, int]] = []

    def open_write(self, key, size_hint=None):
        def own():
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child: list[int] = []
        t = threading.Thread(target=lambda: child.append(own()))
        t.start()
        t.join()
        self.nice.append((own(), child[0]))
        return super().open_write(key, size_hint)


@pytest.mark.parametrize("setting,drop", [(None, 10), ("3", 3), ("0", 0)])
def test_the_upload_runs_below_the_training_loop(tmp_path, monkeypatch, setting, drop):
    if setting is None:
        monkeypatch.delenv("PHOENIX_CHECKPOINT_NICE", raising=False)
    else:
        monkeypatch.setenv("PHOENIX_CHECKPOINT_NICE", setting)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    storage = PriorityProbe(tmp_path)
    ck, _ = make(storage)
    ck.save(snap(10)).result()
    ck.close()
    want = min(19, mine + drop)
    assert storage.nice and all(n == (want, want) for n in storage.nice), storage.nice
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the loop's stays
    # A save the loop waits for (the final one, SIGTERM's) runs at the loop's own priority,
    # after the saves before it.
    storage.nice.clear()
    ck, _ = make(storage)
    first = ck.save(snap(20))
    ck.save(snap(30), blocking=True)
    assert first.done() and [s.step for s in list_checkpoints(storage)][-2:] == [20, 30]
    assert storage.nice[-1] == (mine, mine) and storage.nice[0] == (want, want), storage.nice
    ck.close()


@pytest.mark.parametrize("raw", ["ten", "-1", "20", "1.5"])
def test_a_bad_checkpoint_nice_is_refused_naming_the_variable(tmp_path, monkeypatch, raw):
    monkeypatch.setenv("PHOENIX_CHECKPOINT_NICE", raw)
    with pytest.raises(CheckpointError, match=f"PHOENIX_CHECKPOINT_NICE={raw!r}"):
        make(LocalStorage(tmp_path))
