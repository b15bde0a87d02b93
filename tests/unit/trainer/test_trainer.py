"""The training loop in-process on local-file storage: resume, recovery, SIGTERM, config."""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from phoenix_trainer.attempt_log import read_metrics
from phoenix_trainer.core.contract import TerminationMessage, TrainerEnv
from phoenix_trainer.core.errors import ConfigMismatchError, RecoveryExhaustedError, StageError
from phoenix_trainer.core.layout import latest_valid_checkpoint, list_checkpoints
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.determinism import capture_rng, restore_rng
from phoenix_trainer.samplers import ResumableShuffleSampler
from phoenix_trainer.testing import StopAt, state_dicts_equal, tiny_setup
from phoenix_trainer.trainer import Callback, Trainer

pytestmark = pytest.mark.unit
STEPS = 30  # 8 batches per epoch: crosses three epoch boundaries



def make(tmp_path, *, storage=True, steps=STEPS, env=None, config_extra=None, setup_kw=None, **kw):
    t = tiny_setup(total_steps=steps, **(setup_kw or {}))
    cfg = {**t.config, **(config_extra or {})}
    env = env or TrainerEnv(phase="train", termination_log=str(tmp_path / "termination-log"))
    kw.setdefault("checkpoint_interval_steps", 7)
    trainer = Trainer(t.model, t.optimizer, t.loader, t.loss_fn, scheduler=t.scheduler,
                      grad_clip_norm=0.5, max_steps=steps, config=cfg, env=env,
                      storage=LocalStorage(tmp_path / "ckpt") if storage else None,
                      install_signal_handlers=False, log_every=5, **kw)
    return t, trainer


def reference(tmp_path_factory, steps=STEPS):
    t, tr = make(tmp_path_factory.mktemp("ref"), storage=False, steps=steps)
    assert tr.fit().reason == "completed"
    return t.model.state_dict()


@pytest.fixture(scope="module")
def ref_state(tmp_path_factory):
    return reference(tmp_path_factory)


def test_sampler_is_a_function_of_seed_and_epoch():
    s = ResumableShuffleSampler(20, seed=3)
    s.set_epoch(1)
    full = list(s)
    assert sorted(full) == list(range(20)) and full != list(range(20))
    s.set_epoch(0)
    assert list(s) != full
    s.set_epoch(1)
    s.skip(8)
    assert list(s) == full[8:] and len(s) == 12
    s2 = ResumableShuffleSampler(20, seed=3)
    s2.load_state_dict(s.state_dict())
    assert list(s2) == full[8:]
    with pytest.raises(ValueError, match="dataset now has"):
        ResumableShuffleSampler(21).load_state_dict(s.state_dict())


def test_rng_round_trip():
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    state = capture_rng()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    restore_rng(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("stop_at", [5, 8, 16, 21])  # mid-epoch, epoch boundaries, at a save step
def test_stop_and_resume_is_bit_exact(tmp_path, ref_state, stop_at):
    t1, tr1 = make(tmp_path, callbacks=[StopAt(stop_at)])
    r1 = tr1.fit()
    assert (r1.reason, r1.step, r1.exit_code, r1.emergency_save_completed) == ("preempted", stop_at, 143, True)
    msg = TerminationMessage.from_json((tmp_path / "termination-log").read_text())
    assert msg.reason == "preempted" and msg.step == stop_at and msg.emergencySaveCompleted
    assert msg.checkpoint.endswith("step-%010d" % stop_at)  # 0 steps lost
    assert not state_dicts_equal(t1.model.state_dict(), ref_state)
    t2, tr2 = make(tmp_path)
    r2 = tr2.fit()
    assert tr2.resumed_from.step == stop_at and r2.reason == "completed" and r2.step == STEPS
    assert state_dicts_equal(t2.model.state_dict(), ref_state)
    # bookkeeping: productive time carries over; metrics from both attempts are readable
    events = [(m["attempt"], m["event"]) for m in read_metrics(tr2.storage)]
    assert (0, "start") in events and (1, "resume") in events and (1, "end") in events
    assert all(m["runId"] == tr1.run_id for m in read_metrics(tr2.storage))


def test_resume_falls_back_over_corrupt_latest(tmp_path, ref_state, caplog):
    _, tr1 = make(tmp_path, callbacks=[StopAt(17)])
    tr1.fit()
    latest = tmp_path / "ckpt" / "step-0000000017" / "optimizer.pt"
    data = bytearray(latest.read_bytes()); data[100] ^= 1; latest.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    t2, tr2 = make(tmp_path)
    tr2.fit()
    assert tr2.resumed_from.step == 14
    assert "step-0000000017" in caplog.text and "falling back to the previous valid checkpoint" in caplog.text
    assert state_dicts_equal(t2.model.state_dict(), ref_state)


def test_changed_config_refused_unless_forced(tmp_path):
    make(tmp_path, callbacks=[StopAt(10)])[1].fit()
    with pytest.raises(ConfigMismatchError, match="PHOENIX_FORCE_RESUME=1"):
        make(tmp_path, config_extra={"lr_warmup": 5})[1].fit()
    msg = TerminationMessage.from_json((tmp_path / "termination-log").read_text())
    assert msg.reason == "failed" and "ConfigMismatchError" in msg.message
    env = TrainerEnv(termination_log=str(tmp_path / "t2"), force_resume=True)
    _, tr = make(tmp_path, config_extra={"lr_warmup": 5}, env=env)
    assert tr.fit().reason == "completed" and tr.resumed_from.step == 10


def test_too_little_grace_says_so(tmp_path):
    now = [1000.0]
    env = TrainerEnv(termination_log=str(tmp_path / "termination-log"), grace_seconds=2.0)

    class SigtermLongAgo(Callback):
        def on_step_end(self, trainer, loss):
            if trainer.step == 12:
                trainer.checkpointer.wait()  # step 7's upload is done: the message must name it
                trainer.request_stop()
                now[0] += 1.5  # the step boundary came 1.5 s after the signal

    _, tr = make(tmp_path, env=env, callbacks=[SigtermLongAgo()], clock=lambda: now[0])
    r = tr.fit()
    assert r.exit_code == 143 and not r.emergency_save_completed
    msg = json.loads((tmp_path / "termination-log").read_text())
    assert msg["reason"] == "preempted" and msg["emergencySaveCompleted"] is False
    assert "grace period too short" in msg["message"] and "loses 5 steps" in msg["message"]
    assert msg["checkpoint"].endswith("step-0000000007")
    assert latest_valid_checkpoint(tr.storage).step == 7


def test_emergency_checkpoint_can_be_disabled(tmp_path):
    _, tr = make(tmp_path, callbacks=[StopAt(12)], emergency_checkpoint=False)
    r = tr.fit()
    assert r.exit_code == 143 and not r.emergency_save_completed
    msg = json.loads((tmp_path / "termination-log").read_text())
    assert "emergency checkpoints are disabled" in msg["message"]
    assert latest_valid_checkpoint(tr.storage).step == 7, "only the periodic checkpoint exists"


@pytest.mark.parametrize("method", ["reload", "reinit_epoch"])
def test_flaky_stage_recovers_in_process_bit_exact(tmp_path, ref_state, method):
    t, tr = make(tmp_path, restart_method=method, max_retries=2,
                 setup_kw={"fail_on_calls": (4, 12, 13, 30)})
    r = tr.fit()
    assert r.reason == "completed" and t.flaky.failures == 4
    assert state_dicts_equal(t.model.state_dict(), ref_state)
    recovered = [m for m in tr.metrics.records if m["event"] == "recovered"]
    assert len(recovered) == 4 and all(m["restartMethod"] == method for m in recovered)
    if method == "reinit_epoch":
        assert all(m["restoredStep"] % 8 == 0 for m in recovered)


def test_retries_are_bounded_and_errors_name_the_stage(tmp_path):
    t, tr = make(tmp_path, max_retries=2, setup_kw={"flaky_rate": 1.0})
    with pytest.raises(RecoveryExhaustedError, match="gave up after 2") as ei:
        tr.fit()
    cause = ei.value.__cause__
    assert isinstance(cause, StageError) and cause.stage == "flaky" and cause.step == 1
    assert "stage 'flaky' failed at step 1" in str(cause)
    assert json.loads((tmp_path / "termination-log").read_text())["reason"] == "failed"


def test_non_transient_errors_are_not_retried(tmp_path):
    t, tr = make(tmp_path, storage=False)
    t.model.stage("head").module.weight.data = torch.zeros(3, 3)  # shape bug: not transient
    with pytest.raises(StageError, match="stage 'head'"):
        tr.fit()


def test_retention_protects_resumed_checkpoint(tmp_path):
    env = TrainerEnv(termination_log=str(tmp_path / "t"), checkpoint_keep=2)
    make(tmp_path, env=env, callbacks=[StopAt(3)], checkpoint_interval_steps=2)[1].fit()
    _, tr = make(tmp_path, env=env, checkpoint_interval_steps=2)
    tr.fit()
    steps = [i.step for i in list_checkpoints(tr.storage) if i.valid]
    assert tr.resumed_from.step == 3 and 3 in steps and steps[-2:] == [28, 30]
