"""A periodic checkpoint's copy of the parameters and optimizer state overlaps the next
step's forward and backward (``Trainer.checkpoint``, ``tensors.to_cpu_overlapped``): the
checkpoint still holds exactly its step's state, is settled before the optimizer's step,
survives a stop right after it, and a copy whose sources were written meanwhile is never
saved."""
from __future__ import annotations

import logging

import pytest
import torch

from phoenix_trainer import tensors
from phoenix_trainer.checkpoint import load_checkpoint
from phoenix_trainer.core.contract import TerminationMessage, TrainerEnv
from phoenix_trainer.core.layout import list_checkpoints
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.policies import CheckpointPolicy
from phoenix_trainer.tensors import clone_tree
from phoenix_trainer.testing import StopAt, state_dicts_equal, tiny_setup
from phoenix_trainer.trainer import Callback, Trainer

pytestmark = pytest.mark.unit
EVERY = 5


@pytest.fixture(autouse=True)
def overlap_small_states(monkeypatch):
    # The tiny model is far below the size from which copies are spread and deferred.
    monkeypatch.setattr(tensors, "PARALLEL_COPY_MIN_BYTES", 0)
    monkeypatch.setenv("PHOENIX_SNAPSHOT_THREADS", "2")


class Record(Callback):
    """At each checkpoint step: the state (cloned right after ``checkpoint()`` returned) and
    whether that checkpoint's copy was still to be settled; ``edit(trainer)`` runs after."""

    def __init__(self, edit=None) -> None:
        self.states: dict[int, tuple[dict, dict]] = {}
        self.overlapped: dict[int, bool] = {}
        self.edit = edit

    def on_step_end(self, trainer, loss) -> None:
        if trainer.step % EVERY == 0:
            self.overlapped[trainer.step] = trainer._overlapping is not None
            self.states[trainer.step] = (clone_tree(trainer.model.state_dict()),
                                         clone_tree(trainer.optimizer.state_dict()))
            if self.edit is not None:
                self.edit(trainer)


def make(tmp_path, callbacks, steps=23, **policy):
    t = tiny_setup(total_steps=steps)
    storage = LocalStorage(tmp_path / "ckpt")
    trainer = Trainer(t.model, t.optimizer, t.loader, t.loss_fn, scheduler=t.scheduler,
                      grad_clip_norm=0.5, max_steps=steps, config=t.config, storage=storage,
                      env=TrainerEnv(phase="train", termination_log=str(tmp_path / "term"),
                                     checkpoint_keep=10),  # every checkpoint stays
                      checkpoint=CheckpointPolicy(interval_steps=EVERY, **policy),
                      callbacks=callbacks, install_signal_handlers=False)
    return trainer, storage


def saved(storage, step: int) -> dict:
    info = next(c for c in list_checkpoints(storage) if c.step == step)
    return load_checkpoint(storage, info)


def optimizer_states_equal(a: dict, b: dict) -> bool:
    return a["state"].keys() == b["state"].keys() and all(
        state_dicts_equal(a["state"][k], b["state"][k]) for k in a["state"])


def test_an_overlapped_checkpoint_holds_exactly_its_steps_state(tmp_path):
    rec = Record()
    trainer, storage = make(tmp_path, [rec])
    steps_seen: list[int | None] = []
    step = trainer.optimizer.step

    def watched_step(*a, **k):  # nothing is left to settle when the optimizer writes
        steps_seen.append(trainer._overlapping.step if trainer._overlapping else None)
        return step(*a, **k)

    trainer.optimizer.step = watched_step
    assert trainer.fit().reason == "completed"
    assert rec.overlapped == {5: True, 10: True, 15: True, 20: True}
    assert set(steps_seen) == {None}
    assert [c.step for c in list_checkpoints(storage)] == [5, 10, 15, 20, 23]
    for s in (5, 10, 15, 20):
        shards = saved(storage, s)
        model, optimizer = rec.states[s]
        assert state_dicts_equal(shards["model.pt"], model)
        assert optimizer_states_equal(shards["optimizer.pt"], optimizer)


def test_a_copy_whose_sources_were_written_is_dropped_and_the_next_step_checkpoints(tmp_path, caplog):
    def edit_once(trainer):
        if trainer.step == 10:
            with torch.no_grad():
                next(trainer.model.parameters()).add_(1.0)  # a callback editing in place

    rec = Record(edit_once)
    trainer, storage = make(tmp_path, [rec])
    with caplog.at_level(logging.WARNING, logger="phoenix"):
        assert trainer.fit().reason == "completed"
    steps = [c.step for c in list_checkpoints(storage)]
    assert 10 not in steps and 11 in steps, steps
    assert "step 10 were written in place while its checkpoint copied them" in caplog.text
    # From then on snapshots are copied whole, before checkpoint() returns.
    assert rec.overlapped == {5: True, 10: True, 15: False, 20: False}
    shards = saved(storage, 15)
    assert state_dicts_equal(shards["model.pt"], rec.states[15][0])


def test_a_stop_right_after_an_overlapped_checkpoint_saves_it_losing_nothing(tmp_path):
    rec = Record()
    trainer, storage = make(tmp_path, [rec, StopAt(10)])
    result = trainer.fit()
    assert result.reason == "preempted" and rec.overlapped[10]
    msg = TerminationMessage.from_json((tmp_path / "term").read_text())
    assert msg.step == 10 and msg.checkpoint.endswith("step-0000000010"), msg
    assert state_dicts_equal(saved(storage, 10)["model.pt"], rec.states[10][0])


def test_off_by_policy_every_snapshot_is_whole_when_checkpoint_returns(tmp_path):
    rec = Record()
    trainer, _ = make(tmp_path, [rec], overlap_snapshot=False)
    assert trainer.fit().reason == "completed"
    assert rec.overlapped and not any(rec.overlapped.values())
