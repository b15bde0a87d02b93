"""The Lightning and transformers integrations in-process (local-file storage): what the
kill/resume storage tests cannot see cheaply - the stop lands on an optimizer step boundary
even between accumulated micro-batches, the loader's position, the exactness verdicts, and
that the core never imports a framework."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from phoenix_trainer.core.contract import TerminationMessage, TrainerEnv
from phoenix_trainer.core.layout import list_checkpoints
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.determinism import capture_rng, restore_rng
from phoenix_trainer.session import Session

pytestmark = pytest.mark.unit


def test_importing_the_runtime_imports_no_framework():
    code = ("import sys, phoenix_trainer, phoenix_trainer.integrations;"
            " from phoenix_trainer import Session, Trainer;"
            " bad = [m for m in ('lightning', 'transformers') if m in sys.modules];"
            " assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def session(tmp_path, **kw) -> Session:
    env = TrainerEnv(termination_log=str(tmp_path / "term"), grace_seconds=30)
    return Session(config={"n": 1}, env=env, storage=LocalStorage(tmp_path / "train"),
                   checkpoint_interval_steps=100, **kw)


# ------------------------------------------------------------------ Lightning ------------
L = pytest.importorskip("lightning")


def tensors(n=32):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))


def test_phoenix_loader_resumes_at_the_position_lightning_saved():
    from phoenix_trainer.integrations.lightning import PhoenixLoader

    def loader():
        return PhoenixLoader(DataLoader(tensors(), batch_size=4, shuffle=True,
                                        generator=torch.Generator().manual_seed(3)))

    first = loader()
    epoch0 = [x for x, _ in first]
    epoch1 = [x for x, _ in first]
    assert len(epoch0) == len(first) == 8 and not torch.equal(torch.cat(epoch0), torch.cat(epoch1))
    first.at_step_boundary(1, 3)  # what the callback says after the 3rd batch of epoch 1
    again = loader()
    again.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, (b, _) in zip(epoch1[3:], again, strict=True))
    done = loader()
    done.at_step_boundary(0, 8)  # saved after the epoch's last batch: the next one starts
    assert torch.equal(next(iter(done))[0], epoch1[0])


class Lit(L.LightningModule):
    def __init__(self, sigterm_at_batch: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        self.sigterm_at_batch = sigterm_at_batch

    def training_step(self, batch, batch_idx):
        if batch_idx == self.sigterm_at_batch:
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_sigterm_between_micro_batches_stops_at_the_step_boundary(tmp_path):
    """Lightning's own handler would raise SIGTERMException after the micro-batch (half an
    optimizer step) and exit 0; Phoenix stops after the step, saves it, and exits 143."""
    from phoenix_trainer.integrations.lightning import PhoenixCallback, PhoenixLoader

    before = signal.getsignal(signal.SIGTERM)
    with Session(config={"n": 1}, env=TrainerEnv(termination_log=str(tmp_path / "term")),
                 storage=LocalStorage(tmp_path / "train")) as s:
        phoenix = PhoenixCallback(s)
        trainer = L.Trainer(max_steps=20, accumulate_grad_batches=2, callbacks=[phoenix],
                            accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(tmp_path))
        loader = PhoenixLoader(DataLoader(tensors(), batch_size=4, shuffle=True,
                                          generator=torch.Generator().manual_seed(0)))
        with pytest.raises(SystemExit) as exit_:
            trainer.fit(Lit(sigterm_at_batch=4), loader, ckpt_path=phoenix.restore())
    assert exit_.value.code == 143 == phoenix.exit_code
    assert signal.getsignal(signal.SIGTERM) == before
    msg = TerminationMessage.from_json((tmp_path / "term").read_text())
    # batch 4 is the first micro-batch of step 3
    assert (msg.reason, msg.step, msg.emergencySaveCompleted) == ("preempted", 3, True), msg
    assert [c.step for c in list_checkpoints(LocalStorage(tmp_path / "train"))] == [3]


def test_lightning_hyperparameters_load_with_weights_only():
    from lightning.fabric.utilities.data import AttributeDict

    from phoenix_trainer.integrations.lightning import _plain

    plain = _plain({"hyper_parameters": AttributeDict(lr=0.1, layers=[AttributeDict(d=2)])})
    assert type(plain["hyper_parameters"]) is dict and type(plain["hyper_parameters"]["layers"][0]) is dict


# ------------------------------------------------------------------ transformers ---------
def test_transformers_rng_file_restores_what_phoenix_captured(tmp_path):
    pytest.importorskip("transformers")
    from phoenix_trainer.integrations.transformers import _hf_rng_state

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    saved = capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    current = capture_rng()
    hf = _hf_rng_state(saved)
    assert torch.equal(capture_rng()["torch"], current["torch"])  # the caller's RNG is untouched
    torch.random.set_rng_state(hf["cpu"]), random.setstate(hf["python"]), np.random.set_state(hf["numpy"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    restore_rng(current)


@pytest.mark.parametrize("deterministic", [None, False, True])
def test_transformers_verdict_without_phoenix_loader_is_not_exact_whatever_the_flag(tmp_path, deterministic):
    """restore() without the trainer leaves the Trainer its own loader: not exact, and a
    script's deterministic_data=True no longer changes that (it only warns)."""
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from phoenix_trainer.integrations.transformers import PhoenixCallback

    with session(tmp_path, install_signal_handlers=False) as s:
        if deterministic is None:
            cb = PhoenixCallback(s)
        else:
            with pytest.warns(DeprecationWarning, match="deterministic_data"):
                cb = PhoenixCallback(s, deterministic_data=deterministic)
        assert cb.restore() is None
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
        cb.on_train_begin(args, TrainerState(), TrainerControl(), model=torch.nn.Linear(2, 2))
        assert s.exactness.exact is False
        assert "phoenix.restore(trainer)" in s.exactness.reason and "worker seeds" in s.exactness.reason


def test_transformers_collator_verdicts():
    """Collators whose randomness Phoenix seeds per batch are exact; a masked-LM collator
    with a generator of its own, or one Phoenix does not know, is reported with the reason."""
    pytest.importorskip("transformers")
    from transformers import (DataCollatorForLanguageModeling, DataCollatorWithPadding,
                              DefaultDataCollator, default_data_collator)
    from transformers.trainer_utils import RemoveColumnsCollator

    from phoenix_trainer.integrations.transformers import collator_exactness

    tok = _tokenizer()
    exact = [default_data_collator, DefaultDataCollator(), DataCollatorWithPadding(tok),
             DataCollatorForLanguageModeling(tok, mlm=True),
             RemoveColumnsCollator(DataCollatorForLanguageModeling(tok, mlm=True), ["input_ids"])]
    assert [collator_exactness(c).exact for c in exact] == [True] * len(exact)
    seeded = collator_exactness(RemoveColumnsCollator(DataCollatorForLanguageModeling(tok, seed=3), []))
    assert not seeded.exact and "DataCollatorForLanguageModeling(seed=...)" in seeded.reason

    class MyMasking(DataCollatorForLanguageModeling):  # may draw from a generator of its own
        pass

    assert not collator_exactness(MyMasking(tok)).exact

    def my_collate(features):
        return features

    unknown = collator_exactness(my_collate)
    assert not unknown.exact and "my_collate" in unknown.reason and "not one Phoenix knows" in unknown.reason


def test_transformers_trainer_without_get_resumed_dataloader_keeps_its_loader_and_says_so(tmp_path):
    """Older Trainers skip a resumed epoch's batches inline: Phoenix leaves their loader alone."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from phoenix_trainer.integrations.transformers import PhoenixCallback

    class OldTrainer:
        def __init__(self) -> None:
            self.callback_handler = SimpleNamespace(callbacks=[])

        def add_callback(self, callback) -> None:
            self.callback_handler.callbacks.append(callback)

        def get_train_dataloader(self):
            raise AssertionError("not called here")

    old = OldTrainer()
    own = old.get_train_dataloader
    with session(tmp_path, install_signal_handlers=False) as s:
        cb = PhoenixCallback(s)
        assert cb.restore(old) is None
        assert old.callback_handler.callbacks == [cb] and old.get_train_dataloader == own
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
        cb.on_train_begin(args, TrainerState(), TrainerControl(), model=torch.nn.Linear(2, 2))
        assert not s.exactness.exact and "upgrade transformers" in s.exactness.reason


def test_transformers_extra_state_may_not_replace_the_callbacks_entries(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainerState, TrainingArguments

    from phoenix_trainer.integrations.transformers import PhoenixCallback

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = dict(model=model, optimizer=opt, lr_scheduler=torch.optim.lr_scheduler.StepLR(opt, 1))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    with session(tmp_path, install_signal_handlers=False) as s:
        ok = PhoenixCallback(s, extra_state=lambda: {"ema.pt": {"w": torch.ones(2)}, "stage.json": {"n": 1}})
        state = ok._state(args, TrainerState(), **parts)
        assert torch.equal(state["ema.pt"]["w"], torch.ones(2)) and state["stage.json"] == {"n": 1}
        clash = PhoenixCallback(s, extra_state=lambda: {"model.pt": {}})
        with pytest.raises(ValueError, match="model.pt"):
            clash._state(args, TrainerState(), **parts)


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[MASK]", "a", "b"])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")


# ------------------------------------------------------------------ PHOENIX_INIT_FROM ----
def previous_phase(tmp_path, model: torch.nn.Module) -> str:
    """A finished previous phase holding ``model``'s weights; its prefix URI."""
    with Session(config={"n": 1}, env=TrainerEnv(phase="pretrain", termination_log=str(tmp_path / "t0")),
                 storage=LocalStorage(tmp_path / "pretrain"), install_signal_handlers=False) as s:
        s.restore()
        s.save(5, {"model.pt": model.state_dict()}, blocking=True)
    return (tmp_path / "pretrain").as_uri()


def init_session(tmp_path, init_from: str) -> Session:
    env = TrainerEnv(phase="finetune", init_from=init_from, termination_log=str(tmp_path / "t1"))
    return Session(config={"n": 2}, env=env, storage=LocalStorage(tmp_path / "finetune"),
                   install_signal_handlers=False)


@pytest.mark.parametrize("framework", ["lightning", "transformers"])
def test_a_phase_starts_from_the_previous_phases_weights(tmp_path, framework):
    torch.manual_seed(1)
    trained = Lit(sigterm_at_batch=-1) if framework == "lightning" else torch.nn.Linear(3, 2)
    fresh = Lit(sigterm_at_batch=-1) if framework == "lightning" else torch.nn.Linear(3, 2)
    assert not torch.equal(next(trained.parameters()), next(fresh.parameters()))
    with init_session(tmp_path, previous_phase(tmp_path, trained)) as s:
        if framework == "lightning":
            from phoenix_trainer.integrations.lightning import PhoenixCallback

            cb = PhoenixCallback(s)
            assert cb.restore() is None  # nothing of its own to resume: ckpt_path=None
            cb.setup(L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False), fresh, "fit")
        else:
            from transformers import TrainerControl, TrainerState, TrainingArguments

            from phoenix_trainer.integrations.transformers import PhoenixCallback

            cb = PhoenixCallback(s)
            assert cb.restore() is None
            args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
            cb.on_train_begin(args, TrainerState(), TrainerControl(), model=fresh)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))
