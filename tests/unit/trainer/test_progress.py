"""Heartbeats, the hang rule and stack dumps (core.heartbeat, progress, stacks)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from phoenix_trainer.core.heartbeat import (HANG_FLOOR_SECONDS, HANG_MULTIPLE,
                                            RESTORE_HANG_SECONDS, Heartbeat,
                                            dump_key, hang_timeout, heartbeat_key, stragglers)
from phoenix_trainer.core.storage import open_storage
from phoenix_trainer.progress import Progress, StepClock
from phoenix_trainer.stacks import DUMP_SIGNAL, catches

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_heartbeat_round_trips_as_camel_case_json():
    hb = Heartbeat(attempt=3, rank=1, pod="j-train-3", step=42, activity="training",
                   stalled=1.5, beat=7, steps_timed=40, step_p50=0.1, step_p95=0.2,
                   compute_p50=0.05, hang_timeout=180.0, stack_dump="hangs/attempt-3/rank-1.txt",
                   pid=12)
    raw = hb.to_json()
    doc = json.loads(raw)
    assert doc["stepP95"] == 0.2 and doc["stackDump"].endswith("rank-1.txt") and doc["beat"] == 7
    assert Heartbeat.from_json(raw) == hb
    with pytest.raises(ValueError):
        Heartbeat.from_json(b'{"step": 1}')


def test_hang_timeout_is_explicit_else_a_multiple_of_p95_above_a_floor():
    assert hang_timeout(45, 100.0) == 45
    assert hang_timeout(None, None) == HANG_FLOOR_SECONDS
    assert hang_timeout(None, 0.5) == HANG_FLOOR_SECONDS
    assert hang_timeout(None, 60.0) == HANG_MULTIPLE * 60.0


def test_keys_are_per_attempt_and_rank():
    assert heartbeat_key(4, 2) == "progress/attempt-4/rank-2.json"
    assert dump_key(4, 2) == "hangs/attempt-4/rank-2.txt"


def test_a_straggler_is_persistently_slower_than_the_median_of_the_others():
    many = {0: 40, 1: 40, 2: 40}
    assert stragglers({0: 0.10, 1: 0.11, 2: 0.30}, many) == [2]
    assert stragglers({0: 0.10, 1: 0.11, 2: 0.12}, many) == []
    assert stragglers({0: 0.10, 1: 0.30}, {0: 40, 1: 5}) == []  # too few steps timed
    assert stragglers({0: 0.001, 1: 0.002}, {0: 40, 1: 40}) == []  # 2x, but 1 ms is noise


def test_step_clock_times_steps_and_the_compute_before_the_first_collective():
    clock = FakeClock()
    sc = StepClock(clock)
    sc.boundary(10)  # the first boundary after a restore: no interval yet
    for _ in range(5):
        clock.t += 0.03
        sc.collective()
        clock.t += 0.01
        sc.collective()  # only the step's first counts
        clock.t += 0.06
        sc.boundary(sc.step + 1)
        sc.boundary(sc.step)  # asked twice at one boundary: not a step
    p50, p95, compute = sc.stats()
    assert sc.step == 15 and sc.steps_timed == 5
    assert p50 == pytest.approx(0.1) and p95 == pytest.approx(0.1)
    assert compute == pytest.approx(0.03)
    clock.t += 7
    assert sc.stalled() == pytest.approx(7)


def test_heartbeats_are_written_and_a_stall_dumps_stacks_once(tmp_path):
    storage = open_storage(f"file://{tmp_path}")
    clock = FakeClock()
    p = Progress(storage, rank=1, pod="pod-a", interval=3600, explicit_timeout=30.0,
                 detect=True, clock=clock)
    p.start(attempt=2, activity="restoring")
    try:
        p.step(5)
        p.step(6)
        p.beat_once()
        hb = Heartbeat.from_json(storage.get_bytes(heartbeat_key(2, 1)))
        assert hb.attempt == 2 and hb.rank == 1 and hb.pod == "pod-a"
        clock.t += 29
        assert not p.maybe_dump()
        clock.t += 2
        assert p.activity == "training" and p.maybe_dump()
        assert not p.maybe_dump()  # once per stall
        text = storage.get_bytes(dump_key(2, 1)).decode()
        assert "no progress for 31s at step 6 while training" in text
        assert "test_heartbeats_are_written_and_a_stall_dumps_stacks_once" in text
        assert "state" in text and "waiting in" in text
        p.beat_once()
        hb = Heartbeat.from_json(storage.get_bytes(heartbeat_key(2, 1)))
        assert hb.stack_dump == dump_key(2, 1) and hb.stalled == pytest.approx(31)
        p.step(7)  # progress again: the old dump is not this stall's; a later stall dumps again
        assert Heartbeat.from_json(p.heartbeat().to_json()).stack_dump == ""
        clock.t += 31
        assert p.maybe_dump()
        assert p.heartbeat().stack_dump == dump_key(2, 1)
    finally:
        p.close()
    assert not catches(os.getpid(), DUMP_SIGNAL)  # the handler is gone with the session


def test_a_restore_gets_the_longer_timeout_and_standby_is_not_watched(tmp_path):
    clock = FakeClock()
    p = Progress(open_storage(f"file://{tmp_path}"), interval=3600, detect=True, clock=clock)
    p.start(attempt=1, activity="restoring")
    try:
        assert p.timeout() == RESTORE_HANG_SECONDS
        clock.t += HANG_FLOOR_SECONDS + 1
        assert not p.maybe_dump()
        p.set_activity("standby")
        clock.t += RESTORE_HANG_SECONDS + 1
        assert not p.maybe_dump()
    finally:
        p.close()


HUNG_SCRIPT = textwrap.dedent("""
    import os, socket, sys, time
    import multiprocessing as mp
    from phoenix_trainer.core.storage import open_storage
    from phoenix_trainer.progress import Progress

    def worker_blocked_for_ever(conn):
        conn.recv()  # a DataLoader worker waiting for what never comes

    def stopped_worker():
        while True:
            time.sleep(1)

    def main_loop_waits_on_a_socket_that_never_answers(sock):
        sock.recv(1)

    ctx = mp.get_context("fork")
    p = Progress(open_storage(sys.argv[1]), rank=0, pod="p", interval=0.2,
                 explicit_timeout=1.0, detect=True)
    p.start(attempt=1, activity="training")
    p.step(1)
    a, b = ctx.Pipe()
    w = ctx.Process(target=worker_blocked_for_ever, args=(b,), daemon=True)
    w.start()
    s = ctx.Process(target=stopped_worker, daemon=True)
    s.start()
    time.sleep(0.2)
    os.kill(s.pid, 19)  # SIGSTOP
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    print("pids", w.pid, s.pid, flush=True)
    main_loop_waits_on_a_socket_that_never_answers(cli)
""")


def test_a_hung_process_dumps_its_threads_and_its_forked_workers(tmp_path):
    uri = f"file://{tmp_path}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HUNG_SCRIPT, uri], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        worker, stopped = (int(x) for x in proc.stdout.readline().split()[1:])
        storage = open_storage(uri)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            raw = storage.get_bytes(heartbeat_key(1, 0)) if storage.size(heartbeat_key(1, 0)) else b""
            if raw and Heartbeat.from_json(raw).stack_dump:
                break
            time.sleep(0.2)
        text = storage.get_bytes(dump_key(1, 0)).decode()
    finally:
        proc.kill()
        proc.wait()
        for pid in (worker, stopped):
            try:
                os.kill(pid, signal.SIGKILL)
            except (OSError, UnboundLocalError):
                pass
    assert "main_loop_waits_on_a_socket_that_never_answers" in text
    assert f"=== process {worker} " in text and "worker_blocked_for_ever" in text
    assert f"=== process {stopped} " in text and "stopped; it cannot dump its own stacks" in text
    assert text.index("main_loop_waits") < text.index("worker_blocked_for_ever")


def test_another_program_that_catches_the_signal_is_not_signalled(tmp_path):
    """A descendant running another executable (a Go binary catches every signal; a shell
    trap here) is left alone: only its kernel state goes into the dump."""
    from phoenix_trainer.stacks import StackDumper

    marker = tmp_path / "got-usr2"
    child = subprocess.Popen(["bash", "-c", f"trap 'touch {marker}' USR2; "
                              "while true; do sleep 0.1; done"])
    dumper = StackDumper(str(tmp_path))
    try:
        deadline = time.monotonic() + 10
        while not catches(child.pid, DUMP_SIGNAL) and time.monotonic() < deadline:
            time.sleep(0.05)
        text = dumper.dump("header")
    finally:
        dumper.close()
        child.kill()
        child.wait()
    assert f"=== process {child.pid} " in text
    assert "not a fork of the trainer that catches SIGUSR2" in text
    time.sleep(0.3)
    assert not marker.exists()
    assert "test_another_program_that_catches_the_signal_is_not_signalled" in text
