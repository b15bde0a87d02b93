"""The Session API on its own, driven by a plain loop (local-file storage, in-process)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from phoenix_trainer.core.contract import TerminationMessage, TrainerEnv
from phoenix_trainer.core.layout import list_checkpoints
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.determinism import Exactness, capture_rng, restore_rng
from phoenix_trainer.session import Session
from phoenix_trainer.testing import state_dicts_equal

pytestmark = pytest.mark.unit
STEPS = 12


def session(tmp_path, phase="train", **kw) -> Session:
    env = TrainerEnv(phase=phase, termination_log=str(tmp_path / f"term-{phase}"), **kw.pop("env", {}))
    return Session(config={"lr": 0.1}, env=env, storage=LocalStorage(tmp_path / phase),
                   install_signal_handlers=False, checkpoint_interval_steps=4, **kw)


def loop(s: Session, stop_at: int | None = None):
    """A plain loop the way a user writes one: the model, its optimizer and a step counter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = 0
    restored = s.restore()
    if restored is not None:
        model.load_state_dict(restored["model.pt"])
        if restored.kind == "resume":
            opt.load_state_dict(restored["optimizer.pt"])
            restore_rng(restored["rng.pt"])
            step = restored.step
            assert restored["data.json"] == {"seen": step * 4} and restored.progress == {"seen": step * 4}
    s.started(step)

    def state():
        return {"model.pt": model.state_dict(), "optimizer.pt": opt.state_dict(),
                "rng.pt": capture_rng(), "data.json": {"seen": step * 4}}

    while step < STEPS:
        x = torch.randn(4, 3)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        step += 1
        if step == stop_at:
            s.request_stop()
        if s.stop_requested:
            return s.finish("preempted", step, state=state, progress={"seen": step * 4}), model
        if s.should_checkpoint(step):
            s.save(step, state(), progress={"seen": step * 4})
    return s.finish("completed", step, state=state, progress={"seen": step * 4}), model


@pytest.fixture(scope="module")
def ref_model(tmp_path_factory):
    with session(tmp_path_factory.mktemp("ref")) as s:
        result, model = loop(s)
    assert (result.reason, result.exit_code) == ("completed", 0)
    return model.state_dict()


@pytest.mark.parametrize("stop_at", [3, 4, 9])
def test_plain_loop_stops_and_resumes_bit_exact(tmp_path, ref_model, stop_at):
    with session(tmp_path) as s:
        result, _ = loop(s, stop_at)
    assert (result.reason, result.exit_code, result.step, result.emergency_save_completed) == \
        ("preempted", 143, stop_at, True)
    msg = TerminationMessage.from_json((tmp_path / "term-train").read_text())
    assert msg.checkpoint.endswith(f"step-{stop_at:010d}") and msg.resumeExact is True
    with session(tmp_path, env={"attempt": 1}) as s:
        result, model = loop(s)
    assert s.resumed_from.step == stop_at and result.reason == "completed"
    assert state_dicts_equal(model.state_dict(), ref_model)
    assert [c.step for c in list_checkpoints(s.storage)][-1] == STEPS


def test_an_exception_in_the_loop_is_a_failed_termination_message(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with session(tmp_path) as s:
            s.restore()
            s.should_checkpoint(5)
            1 / 0
    msg = TerminationMessage.from_json((tmp_path / "term-train").read_text())
    assert (msg.reason, msg.step) == ("failed", 5) and "ZeroDivisionError" in msg.message


def test_completed_without_state_and_misuse(tmp_path):
    with session(tmp_path, exactness=Exactness(False, "my loader is a generator")) as s:
        s.restore()
        with pytest.raises(RuntimeError, match="already called"):
            s.restore()
        with pytest.raises(ValueError, match="use 'completed' or 'preempted'"):
            s.finish("done", 3)
        s.save(3, {"model.pt": {"w": torch.ones(2)}, "notes.json": {"a": 1}})
        result = s.finish("completed", 3)  # the save of step 3 is the final checkpoint
    assert result.emergency_save_completed and result.checkpoint.endswith("step-0000000003")
    manifest = json.loads((tmp_path / "train" / "step-0000000003" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "notes.json", "trainer.json"}
    assert manifest["extra"] == {"resumeExact": False, "resumeExactReason": "my loader is a generator"}
    msg = TerminationMessage.from_json((tmp_path / "term-train").read_text())
    assert msg.resumeExact is False and msg.resumeExactReason == "my loader is a generator"


def test_a_later_phase_is_initialised_from_the_previous_one(tmp_path, ref_model):
    with session(tmp_path) as s:
        loop(s)
    env = {"init_from": f"file://{tmp_path}/train/step-{STEPS:010d}"}
    with session(tmp_path, phase="finetune", env=env) as s:
        restored = s.restore()
    assert restored.kind == "init" and restored.step == 0 and s.resumed_from is None
    assert state_dicts_equal(restored["model.pt"], ref_model)


def test_start_record_says_where_the_start_up_went(tmp_path, caplog):
    """The start record splits the process's start-up: the script's part before the session,
    the restore, the total from the kernel's start time of the process."""
    import time as _time
    from datetime import datetime

    from phoenix_trainer.attempt_log import process_start_time

    began = process_start_time()
    assert began is not None and began <= _time.time()
    with caplog.at_level("INFO", logger="phoenix"):
        with session(tmp_path) as s:
            loop(s, stop_at=None)
            records = s.metrics.records
    start = next(r for r in records if r["event"] == "start")["startup"]
    assert set(start) == {"processStart", "beforeSession", "restore", "total"}
    assert 0 < start["beforeSession"] <= start["total"] and 0 <= start["restore"] <= start["total"]
    when = datetime.fromisoformat(start["processStart"].replace("Z", "+00:00")).timestamp()
    assert abs(when - began) < 0.05
    assert any(", up " in m and "before the session" in m and "restore" in m
               for m in caplog.messages)


def test_an_entry_a_restore_could_not_load_is_refused_at_its_first_save(tmp_path):
    """torch.load(weights_only=True) refuses numpy arrays and classes of the script's own:
    saved, they would make every checkpoint one that restores skip."""
    import numpy as np

    from phoenix_trainer.core.errors import CheckpointError

    with session(tmp_path) as s:
        s.restore()
        s.save(1, {"ema.pt": {"w": torch.ones(2), "n": 3, "names": ("a", "b")}, "pos.json": {"b": 1}},
               blocking=True)
        with pytest.raises(CheckpointError, match=r"'buffer.pt' holds .*numpy.*torch.from_numpy"):
            s.save(2, {"ema.pt": {"w": torch.ones(2)}, "buffer.pt": {"x": np.ones(3)}}, blocking=True)
        assert [c.step for c in list_checkpoints(s.storage)] == [1]
        s.save(3, {"buffer.pt": {"x": torch.from_numpy(np.ones(3))}}, blocking=True)
        restored = s.restorer.find_own(None)
    assert torch.equal(restored["buffer.pt"]["x"], torch.ones(3, dtype=torch.float64))


def test_a_storage_blip_while_finding_the_checkpoint_to_resume_is_retried(tmp_path):
    """A replacement pod whose first S3 requests timed out (a connect timeout on the manifest
    GET) failed its attempt at restore, charging the failure budget for a network blip that
    the uploads of the same runtime retry through (an e2e run saw it)."""
    from phoenix_trainer.core.errors import StorageError
    from phoenix_trainer.core.writer import RetryPolicy
    from phoenix_trainer.policies import CheckpointPolicy

    first, _ = loop(session(tmp_path), stop_at=6)
    assert first.checkpoint is not None
    storage = LocalStorage(tmp_path / "train")
    blips, slept = [2], []
    real_list_dirs = storage.list_dirs

    def flaky_list_dirs(prefix):
        if blips[0]:
            blips[0] -= 1
            raise StorageError("S3 list failed: Connect timeout on endpoint URL")
        return real_list_dirs(prefix)

    storage.list_dirs = flaky_list_dirs
    env = TrainerEnv(phase="train", termination_log=str(tmp_path / "term-2"))
    s = Session(config={"lr": 0.1}, env=env, storage=storage, install_signal_handlers=False,
                checkpoint=CheckpointPolicy(interval_steps=4,
                                            retry=RetryPolicy(sleep=slept.append)))
    with s:
        restored = s.restore()
    assert restored is not None and restored.step == 6 and blips == [0] and len(slept) == 2


def _final_manifest_fails(storage: LocalStorage, times: int, error=None) -> list[int]:
    """Make the manifest write of step STEPS fail ``times`` times (default: a storage outage
    at the end of the run); the list counts the failures left."""
    from phoenix_trainer.core.errors import StorageError

    left, real_put = [times], storage.put_bytes
    error = error or StorageError("S3 put failed: Could not connect to the endpoint URL")

    def put_bytes(key, data):
        if key == f"step-{STEPS:010d}/manifest.json" and left[0]:
            left[0] -= 1
            raise error
        return real_put(key, data)

    storage.put_bytes = put_bytes
    return left


def _outage_session(tmp_path, storage, slept: list[float], final_tries: int) -> Session:
    from phoenix_trainer.core.writer import RetryPolicy
    from phoenix_trainer.policies import CheckpointPolicy

    env = TrainerEnv(phase="train", termination_log=str(tmp_path / "term-train"))
    return Session(config={"lr": 0.1}, env=env, storage=storage, install_signal_handlers=False,
                   checkpoint=CheckpointPolicy(
                       interval_steps=4, retry=RetryPolicy(attempts=1),
                       final_retry=RetryPolicy(attempts=final_tries, sleep=slept.append)))


def test_the_final_checkpoint_waits_out_a_storage_outage(tmp_path, ref_model):
    """A reference run whose last save met a 30 s S3 outage ended "completed" without its
    final checkpoint (the writer's retries last ~10 s): its newest checkpoint was 20 steps
    short of its weights (an e2e chaos run saw it). The final save is tried again, with
    backoff, until it lands."""
    storage = LocalStorage(tmp_path / "train")
    left, slept = _final_manifest_fails(storage, 3), []
    with _outage_session(tmp_path, storage, slept, final_tries=5) as s:
        result, model = loop(s)
    # The interval save of the last step failed once, the final save twice more, then landed.
    assert left == [0] and len(slept) == 2 and all(d > 0 for d in slept)
    assert (result.reason, result.exit_code, result.step) == ("completed", 0, STEPS)
    assert result.checkpoint.endswith(f"step-{STEPS:010d}") and result.emergency_save_completed
    assert state_dicts_equal(model.state_dict(), ref_model)


def test_a_final_checkpoint_that_never_lands_fails_the_attempt(tmp_path):
    """Storage down for longer than the final retries: the attempt fails (exit 1) instead of
    succeeding with an older checkpoint, so the next attempt trains the rest again."""
    storage = LocalStorage(tmp_path / "train")
    left, slept = _final_manifest_fails(storage, 100), []
    with _outage_session(tmp_path, storage, slept, final_tries=3) as s:
        result, _ = loop(s)
    assert len(slept) == 2 and left == [100 - 4]  # the interval save, then three final tries
    assert (result.reason, result.exit_code, result.step) == ("failed", 1, STEPS)
    assert result.checkpoint.endswith(f"step-{STEPS - 4:010d}")
    msg = TerminationMessage.from_json((tmp_path / "term-train").read_text())
    assert msg.reason == "failed" and f"final checkpoint at step {STEPS} failed" in msg.message
    assert [c.step for c in list_checkpoints(storage) if c.valid][-1] == STEPS - 4


def test_a_final_checkpoint_refused_for_another_reason_is_not_retried(tmp_path):
    """Only storage errors are waited out; anything else fails the attempt at once."""
    from phoenix_trainer.core.errors import CheckpointError

    storage = LocalStorage(tmp_path / "train")
    left, slept = _final_manifest_fails(storage, 100, CheckpointError("refused")), []
    with _outage_session(tmp_path, storage, slept, final_tries=5) as s:
        result, _ = loop(s)
    assert slept == [] and left == [100 - 2]  # the interval save, then one final try
    assert (result.reason, result.exit_code) == ("failed", 1) and "refused" in result.message
