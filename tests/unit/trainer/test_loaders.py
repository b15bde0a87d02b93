"""Loader positions: the same batches, with the same worker randomness, after any resume."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, TensorDataset

from phoenix_trainer.core.contract import TerminationMessage, TrainerEnv
from phoenix_trainer.core.errors import CheckpointError
from phoenix_trainer.core.layout import latest_valid_checkpoint
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.loaders import (
    ReplayLoader, ResumableLoader, StatefulLoader, adapt_loader,
)
from phoenix_trainer.testing import StopAt, NoisyDataset, make_loader, state_dicts_equal, tiny_setup
from phoenix_trainer.trainer import Trainer

pytestmark = pytest.mark.unit
EPOCHS = 3


def noisy_data(n: int = 44) -> NoisyDataset:
    g = torch.Generator().manual_seed(5)
    return NoisyDataset(torch.randn(n, 3, generator=g), torch.arange(n))


def run(adapter, start=(0, 0)):
    """Every batch from ``start`` = (epoch, batches consumed) to the end of EPOCHS."""
    out = []
    epoch, skip = start
    for e in range(epoch, EPOCHS):
        out += [(e, b) for b in adapter.epoch_iterator(e, skip if e == epoch else 0)]
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        ea == eb and all(torch.equal(x, y) for x, y in zip(ba, bb)) for (ea, ba), (eb, bb) in zip(a, b))


@pytest.mark.parametrize("kind", ["shuffle", "shuffle-global", "sampler"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_replays_the_same_batches_and_transforms(kind, workers):
    torch.manual_seed(11)
    ref_adapter = adapt_loader(make_loader(noisy_data(), kind=kind, batch_size=4, workers=workers, seed=3))
    assert isinstance(ref_adapter, ResumableLoader) and ref_adapter.exactness.exact
    full = run(ref_adapter)
    per_epoch = ref_adapter.batches_per_epoch
    assert per_epoch == 11 and len(full) == EPOCHS * per_epoch
    assert not same(full[:per_epoch], full[per_epoch:2 * per_epoch])  # epochs differ
    state = ref_adapter.state_dict()
    for epoch, skip in [(0, 3), (1, 0), (1, 10), (2, 5)]:
        torch.manual_seed(11)  # the process is seeded as before; everything else is fresh
        random.seed(99); np.random.seed(99)
        adapter = adapt_loader(make_loader(noisy_data(), kind=kind, batch_size=4, workers=workers, seed=3))
        adapter.load_state_dict(state)
        rest = run(adapter, (epoch, skip))
        assert same(rest, full[epoch * per_epoch + skip:]), (epoch, skip)


def test_batches_do_not_depend_on_the_worker_count():
    torch.manual_seed(2)
    a = run(adapt_loader(make_loader(noisy_data(), kind="shuffle", batch_size=4, workers=1)))
    b = run(adapt_loader(make_loader(noisy_data(), kind="shuffle", batch_size=4, workers=2)))
    assert same(a, b)


def test_loading_batches_leaves_the_training_rng_alone():
    adapter = adapt_loader(make_loader(noisy_data(), kind="shuffle-global", batch_size=4))
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    want = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    for _ in adapter.epoch_iterator(0, 0):
        pass
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def random_mask_collate(samples):
    """A collate function that draws (a masked-LM collator's shape): from the global RNGs."""
    x, y = torch.utils.data.default_collate(samples)
    return x * (torch.rand(x.shape) < 0.5), y


@pytest.mark.parametrize("workers", [0, 2])
def test_a_random_collate_function_repeats_after_a_resume_and_leaves_the_training_rng_alone(workers):
    """The collate function runs inside the batch's seeded region, also in the main process."""
    def loader():
        return adapt_loader(DataLoader(noisy_data(), batch_size=4, shuffle=True, num_workers=workers,
                                       collate_fn=random_mask_collate, generator=torch.Generator().manual_seed(3)))

    full = run(loader())
    assert same(run(loader(), (1, 4)), full[11 + 4:])
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    for _ in loader().epoch_iterator(0, 0):
        pass
    assert torch.equal(torch.rand(3), want)
    if workers == 2:  # and the batches are the same however many processes fetch them
        zero = adapt_loader(DataLoader(noisy_data(), batch_size=4, shuffle=True, num_workers=0,
                                       collate_fn=random_mask_collate, generator=torch.Generator().manual_seed(3)))
        assert same(run(zero), full)


def test_the_users_loader_and_generator_are_not_touched():
    g = torch.Generator().manual_seed(7)
    before = g.get_state().clone()
    loader = DataLoader(noisy_data(), batch_size=4, shuffle=True, generator=g)
    run(adapt_loader(loader))
    assert torch.equal(g.get_state(), before) and loader.sampler.generator is g


class OpaqueSampler(Sampler[int]):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.randperm(self.n).tolist())

    def __len__(self):
        return self.n


class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.arange(12).view(-1, 1))


class WithState:
    batch_size = 2

    def __init__(self):
        self.pos = 0

    def __iter__(self):
        return iter([torch.tensor([i]) for i in range(self.pos, 6)])

    def state_dict(self):
        return {"pos": self.pos, "t": torch.tensor([1, 2])}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_what_cannot_be_restored_says_why():
    data = TensorDataset(torch.arange(12))
    opaque = adapt_loader(DataLoader(data, batch_size=2, sampler=OpaqueSampler(12)))
    assert not opaque.exactness.exact and "OpaqueSampler" in opaque.exactness.reason
    stream = adapt_loader(DataLoader(Stream(), batch_size=2))
    assert isinstance(stream, ReplayLoader) and "IterableDataset Stream" in stream.exactness.reason
    assert [b.tolist() for b in stream.epoch_iterator(0, 4)] == [[[8], [9]], [[10], [11]]]
    listed = adapt_loader([torch.zeros(1)] * 3)
    assert isinstance(listed, ReplayLoader) and "list is not a DataLoader" in listed.exactness.reason
    stateful = adapt_loader(WithState())
    assert isinstance(stateful, StatefulLoader) and not stateful.exactness.exact
    stateful.loader.pos = 4
    saved = stateful.state_dict()  # holds a tensor: stored as torch.save bytes inside the JSON
    fresh = adapt_loader(WithState())
    fresh.load_state_dict(saved)
    assert [int(b) for b in fresh.epoch_iterator(0, 4)] == [4, 5]


# --------------------------------------------------------------------- the trainer ---------

STEPS = 16  # 11 micro-batches per epoch, 2 per step: 6 steps per epoch, the last one short


def make(tmp_path, *, kind="shuffle", workers=2, accumulate=2, callbacks=(), storage=True):
    t = tiny_setup(total_steps=STEPS, samples=88, batch_size=8, loader=kind, workers=workers, noisy=True)
    env = TrainerEnv(phase="train", termination_log=str(tmp_path / "termination-log"))
    tr = Trainer(t.model, t.optimizer, t.loader, t.loss_fn, scheduler=t.scheduler, grad_clip_norm=0.5,
                 max_steps=STEPS, config=t.config, env=env, accumulate_grad_batches=accumulate,
                 storage=LocalStorage(tmp_path / "ckpt") if storage else None,
                 checkpoint_interval_steps=5, install_signal_handlers=False, callbacks=callbacks)
    return t, tr


@pytest.fixture(scope="module")
def ref_accumulated(tmp_path_factory):
    t, tr = make(tmp_path_factory.mktemp("ref"), storage=False)
    r = tr.fit()
    assert (r.reason, r.step, tr.epoch, tr.batch_in_epoch, tr.samples_seen) == ("completed", STEPS, 2, 8, 30 * 8)
    return t.model.state_dict()


@pytest.mark.parametrize("stop_at", [4, 6, 7])  # mid-epoch, at the epoch's short last step, after it
def test_accumulation_with_workers_resumes_bit_exact(tmp_path, ref_accumulated, stop_at):
    t1, tr1 = make(tmp_path, callbacks=[StopAt(stop_at)])
    assert tr1.fit().step == stop_at
    t2, tr2 = make(tmp_path)
    assert tr2.fit().reason == "completed" and tr2.resumed_from.step == stop_at
    assert state_dicts_equal(t2.model.state_dict(), ref_accumulated)
    assert tr2.samples_seen == 30 * 8


def test_accumulation_is_not_one_batch_per_step(tmp_path, ref_accumulated):
    t, tr = make(tmp_path, accumulate=1, storage=False)
    tr.fit()
    assert tr.samples_seen == STEPS * 8 and not state_dicts_equal(t.model.state_dict(), ref_accumulated)


def test_changing_accumulation_is_refused(tmp_path):
    make(tmp_path, callbacks=[StopAt(3)])[1].fit()
    with pytest.raises(CheckpointError, match="accumulate_grad_batches=2, this run uses 3"):
        make(tmp_path, accumulate=3)[1].fit()


def test_inexact_resume_is_reported_in_manifest_and_termination_message(tmp_path):
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
    t = tiny_setup(total_steps=6)
    loader = DataLoader(data, batch_size=8, sampler=OpaqueSampler(32))
    env = TrainerEnv(phase="train", termination_log=str(tmp_path / "termination-log"))
    tr = Trainer(t.model, t.optimizer, loader, t.loss_fn, max_steps=6, env=env,
                 storage=LocalStorage(tmp_path / "ckpt"), install_signal_handlers=False)
    assert tr.fit().reason == "completed"
    msg = TerminationMessage.from_json((tmp_path / "termination-log").read_text())
    assert msg.resumeExact is False and "OpaqueSampler" in msg.resumeExactReason
    info = latest_valid_checkpoint(tr.storage)
    assert info.manifest.extra["resumeExact"] is False
    assert "OpaqueSampler" in info.manifest.extra["resumeExactReason"]
