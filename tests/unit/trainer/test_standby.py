"""The trainer's side of notices, handoffs and warm standbys (control.py, Session), in-process
on local-file storage: the operator's writes are made by hand, as it would make them."""
from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest

from phoenix_lab.procs import free_port
from phoenix_trainer import restore as restore_mod
from phoenix_trainer import standby as standby_mod
from phoenix_trainer.core.contract import TerminationMessage
from phoenix_trainer.core.handshake import Control, Fence, read_fence, write_control, write_fence
from phoenix_trainer.core.layout import list_checkpoints
from phoenix_trainer.session import StandbyEnded
from phoenix_trainer.testing import state_dicts_equal

from test_session import STEPS, loop, ref_model, session  # noqa: F401 - fixture reused

pytestmark = pytest.mark.unit
POLL = 0.02


def control(storage, **kw) -> None:
    write_control(storage, Control(**kw))


def fence(storage, attempt: int, resume_from: str = "") -> None:
    write_fence(storage, Fence(attempt, f"pod-{attempt}", "t", resume_from))


def env(attempt: int, role: str = "active", **kw) -> dict:
    return {"attempt": attempt, "role": role, "control_poll_seconds": POLL, **kw}


class Standby(threading.Thread):
    """A standby trainer waiting in ``Session.restore`` on a thread of its own."""

    def __init__(self, tmp_path, attempt: int) -> None:
        super().__init__(daemon=True)
        self.session = session(tmp_path, env=env(attempt, "standby"))
        self.result = self.model = self.error = None

    def start(self) -> None:
        """Start, and return once it waits in restore(): the loop seeds and draws from the
        global RNGs (separate processes in real life), so the active loop must not run while
        the standby builds its model."""
        super().start()
        for _ in range(3000):
            if self.session.restore_started or not self.is_alive():
                return
            threading.Event().wait(0.01)
        raise AssertionError("the standby never reached restore()")

    def run(self) -> None:
        try:
            with self.session as s:
                self.result, self.model = loop(s)
        except BaseException as e:  # noqa: BLE001 - looked at by the test
            self.error = e


@pytest.fixture(autouse=True)
def fast_prefetch(monkeypatch):
    monkeypatch.setattr(standby_mod, "STANDBY_PREFETCH_SECONDS", 0.0)


def test_handoff_to_a_waiting_standby_is_bit_exact(tmp_path, ref_model):
    standby = Standby(tmp_path, attempt=2)
    standby.start()
    active = session(tmp_path, env=env(1))

    with active as s:
        original = s.should_checkpoint

        def should_checkpoint(step):
            if step == 6:  # the operator decides to hand off while step 6 trains
                control(s.storage, attempt=1, handoff_to=2, handoff_pod="pod-2")
                s.control.poll_once()
            return original(step)

        s.should_checkpoint = should_checkpoint
        result, _ = loop(s)
    # The handoff takes effect at the next step boundary: step 7.
    assert (result.reason, result.exit_code, result.step, result.emergency_save_completed) == \
        ("preempted", 143, 7, True)
    assert "handed off to attempt 2" in result.message
    f = read_fence(s.storage)
    assert (f.attempt, f.resume_from) == (2, result.checkpoint)
    assert result.checkpoint.endswith("step-0000000007")
    standby.join(timeout=60)
    assert standby.error is None and standby.result.reason == "completed"
    assert standby.session.resumed_from.step == 7
    assert state_dicts_equal(standby.model.state_dict(), ref_model)


def test_promotion_uses_the_preloaded_checkpoint(tmp_path, ref_model, monkeypatch):
    with session(tmp_path, env=env(1)) as s:
        result, _ = loop(s, stop_at=5)  # an emergency checkpoint at 5, then the pod is gone
    assert result.checkpoint.endswith("step-0000000005")
    loads = []
    real_load = restore_mod.LocalLoader.load
    monkeypatch.setattr(restore_mod.LocalLoader, "load", lambda self, st, info, pre:
                        loads.append(info.step) or real_load(self, st, info, pre))
    standby = Standby(tmp_path, attempt=2)
    standby.start()
    for _ in range(500):
        if standby.session.restorer.warm is not None:
            break
        threading.Event().wait(0.01)
    assert standby.session.restorer.warm.step == 5
    fence(standby.session.storage, 2, result.checkpoint)  # the operator promotes it
    standby.join(timeout=60)
    assert standby.error is None and standby.result.reason == "completed"
    assert loads == [5]  # downloaded once, while waiting; the resume itself loaded nothing
    assert state_dicts_equal(standby.model.state_dict(), ref_model)


def test_checkpoint_now_saves_once_at_the_next_step_boundary(tmp_path):
    with session(tmp_path, env=env(1)) as s:
        original = s.should_checkpoint

        def should_checkpoint(step):
            if step in (5, 6):  # the same request read twice: one checkpoint
                control(s.storage, attempt=1, checkpoint_now="notice spot-1")
                s.control.poll_once()
            if step == 9:  # addressed to another attempt: ignored
                control(s.storage, attempt=7, checkpoint_now="other")
                s.control.poll_once()
            return original(step)

        s.should_checkpoint = should_checkpoint
        result, _ = loop(s)
    assert result.reason == "completed"
    # interval 4 gives 4, 8, 12; the notice adds 5 (asked during step 5, saved at its
    # boundary) and nothing at 6 or 9; keep=3 has pruned 4.
    assert [c.step for c in list_checkpoints(s.storage)] == [5, 8, 12]


@pytest.mark.parametrize("how", ["sigterm", "superseded"])
def test_a_standby_that_is_not_promoted_ends_as_preempted(tmp_path, how):
    standby = Standby(tmp_path, attempt=2)
    standby.start()
    threading.Event().wait(0.2)
    if how == "sigterm":
        standby.session.request_stop()
    else:
        fence(standby.session.storage, 3)
    standby.join(timeout=30)
    assert isinstance(standby.error, StandbyEnded) and standby.error.code == 143
    msg = TerminationMessage.from_json((tmp_path / "term-train").read_text())
    assert msg.reason == "preempted" and msg.checkpoint is None
    assert ("stopped" if how == "sigterm" else "superseded by attempt 3") in msg.message


def _ready(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


def test_readiness_follows_restore(tmp_path):
    port = free_port()
    with session(tmp_path, env=env(1, status_port=port)) as s:
        assert _ready(port) == 503
        s.restore()
        assert _ready(port) == 200
    # Issue 22, item 11: it keeps answering until the process exits. Closed with the session,
    # every pod that ended cleanly got "Unhealthy" readiness warnings while its container
    # wrote the termination message and exited.
    assert _ready(port) == 200
    s.status_server.close()  # what the interpreter's exit does
    with pytest.raises(OSError):
        _ready(port)


def test_a_handoff_always_saves_first_whatever_the_grace(tmp_path):
    """Issue 22, item 6: a handoff is the operator's request, not a SIGTERM: nothing is
    killing the pod, so the final checkpoint is made even when the SIGTERM grace period
    would be too short for it (here: none at all)."""
    with session(tmp_path, env=env(1, grace_seconds=0.0)) as s:
        original = s.should_checkpoint

        def should_checkpoint(step):
            if step == 6:
                control(s.storage, attempt=1, handoff_to=2, handoff_pod="pod-2")
                s.control.poll_once()
            return original(step)

        s.should_checkpoint = should_checkpoint
        result, _ = loop(s)
    assert result.emergency_save_completed, result.message
    assert result.checkpoint.endswith("step-0000000007") and "handed off to attempt 2" in result.message
