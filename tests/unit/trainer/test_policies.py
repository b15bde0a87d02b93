"""Trainer and Session are configured with policy objects; the keywords they replaced keep
working for one release, each with a DeprecationWarning that names its replacement."""
from __future__ import annotations

import warnings

import pytest

from phoenix_trainer import CheckpointPolicy, DataPolicy, RecoveryPolicy, ReportingPolicy
from phoenix_trainer.core.contract import TrainerEnv
from phoenix_trainer.session import Session
from phoenix_trainer.testing import tiny_setup
from phoenix_trainer.trainer import Trainer
from phoenix_trainer.core.writer import RetryPolicy

pytestmark = pytest.mark.unit
RETRY = RetryPolicy(attempts=2)

# old keyword, a value that is not its default, the replacement the warning must name, and
# where the value must land. Written out here, not derived from policies.LEGACY_KEYWORDS, so
# that a row missing from that table (or mapped to the wrong field) fails.
OLD = [
    ("checkpoint_interval_steps", 7, "checkpoint=CheckpointPolicy(interval_steps=",
     lambda t: t.session.interval_steps),
    ("checkpoint_interval_seconds", 12.5, "checkpoint=CheckpointPolicy(interval_seconds=",
     lambda t: t.session.interval_seconds),
    ("max_in_flight", 3, "checkpoint=CheckpointPolicy(max_in_flight=",
     lambda t: t.session.checkpointing.policy.max_in_flight),
    ("retry_policy", RETRY, "checkpoint=CheckpointPolicy(retry=",
     lambda t: t.session.checkpointing.policy.retry),
    ("emergency_checkpoint", False, "checkpoint=CheckpointPolicy(emergency=",
     lambda t: t.session.finisher.emergency),
    ("init_strict", False, "checkpoint=CheckpointPolicy(init_strict=", lambda t: t.init_strict),
    ("restart_method", "reinit_epoch", "recovery=RecoveryPolicy(restart_method=",
     lambda t: t.restart_method),
    ("max_retries", 9, "recovery=RecoveryPolicy(max_retries=", lambda t: t.max_retries),
    ("retry_on", (KeyError,), "recovery=RecoveryPolicy(retry_on=", lambda t: t.retry_on),
    ("snapshot_interval_steps", 11, "recovery=RecoveryPolicy(snapshot_interval_steps=",
     lambda t: t.snapshot_interval),
    ("accumulate_grad_batches", 2, "data=DataPolicy(accumulate_grad_batches=",
     lambda t: t.accumulate),
    ("log_every", 3, "reporting=ReportingPolicy(log_every=", lambda t: t.log_every),
    ("metrics_interval_seconds", 5.0, "reporting=ReportingPolicy(metrics_interval_seconds=",
     lambda t: t.session.checkpointing.metrics_interval),
]


def trainer(tmp_path, **kw) -> Trainer:
    t = tiny_setup(total_steps=4)
    return Trainer(t.model, t.optimizer, t.loader, t.loss_fn, max_steps=4, config=t.config,
                   env=TrainerEnv(phase="train", termination_log=str(tmp_path / "term")),
                   install_signal_handlers=False, **kw)


@pytest.mark.parametrize("key,value,replacement,landed", OLD, ids=[row[0] for row in OLD])
def test_an_old_keyword_still_works_and_warns_naming_its_replacement(tmp_path, key, value,
                                                                    replacement, landed):
    with pytest.warns(DeprecationWarning) as caught:
        tr = trainer(tmp_path, **{key: value})
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(f"Trainer({key}=...)" in m and replacement in m for m in messages), messages
    assert landed(tr) == value
    assert landed(trainer(tmp_path)) != value  # the value came from the keyword, not a default
    tr.session.close()


def test_the_policies_configure_what_the_keywords_did_without_warnings(tmp_path):
    policies = dict(
        checkpoint=CheckpointPolicy(interval_steps=7, interval_seconds=12.5, max_in_flight=3,
                                    retry=RETRY, emergency=False, init_strict=False),
        recovery=RecoveryPolicy(restart_method="reinit_epoch", max_retries=9, retry_on=(KeyError,),
                                snapshot_interval_steps=11),
        data=DataPolicy(accumulate_grad_batches=2),
        reporting=ReportingPolicy(log_every=3, metrics_interval_seconds=5.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        tr = trainer(tmp_path, **policies)
    for key, value, _, landed in OLD:
        assert landed(tr) == value, key


def test_a_policy_given_wins_over_old_keywords_for_it(tmp_path):
    """``StagedModule.fit`` passes the module's restart_method / max_retries as old keywords:
    a RecoveryPolicy given with them must not be overridden."""
    with pytest.warns(DeprecationWarning, match="ignored, recovery= was given"):
        tr = trainer(tmp_path, recovery=RecoveryPolicy(max_retries=5), max_retries=3,
                     checkpoint_interval_steps=4)
    assert (tr.max_retries, tr.session.interval_steps) == (5, 4)


def test_an_unknown_keyword_is_still_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="checkpoint_every"):
        trainer(tmp_path, checkpoint_every=3)


def test_session_takes_the_checkpoint_policy_and_its_old_keywords(tmp_path):
    env = TrainerEnv(phase="train", termination_log=str(tmp_path / "term"))
    with pytest.warns(DeprecationWarning, match=r"Session\(checkpoint_interval_steps=\.\.\.\).*"
                                                r"CheckpointPolicy\(interval_steps="):
        old = Session(env=env, install_signal_handlers=False, checkpoint_interval_steps=5)
    new = Session(env=env, install_signal_handlers=False, checkpoint=CheckpointPolicy(interval_steps=5))
    assert old.interval_steps == new.interval_steps == 5
    with pytest.raises(TypeError, match="restart_method"):  # a Trainer-only policy field
        Session(env=env, install_signal_handlers=False, restart_method="reload")
