"""A trainer container that declares an ephemeral-storage limit learns it (downward API), and
the runtime keeps its spool under it by default: an eviction for ephemeral storage would look
like a preemption and repeat (issue 28, deliverable 3)."""
from __future__ import annotations

import pytest

from phoenix_operator.phoenixjob import JobSpec
from phoenix_operator.podspec import build_pod
from phoenix_trainer.checkpoint import spool_limit_bytes
from phoenix_trainer.core.contract import ENV_EPHEMERAL_STORAGE_MB, ENV_SPOOL_LIMIT_MB

from opfacts import job

pytestmark = pytest.mark.unit


def _trainer_env(resources: dict | None) -> dict[str, dict]:
    body = job()
    container = {"name": "trainer", "image": "img"}
    if resources is not None:
        container["resources"] = resources
    body["spec"]["template"]["spec"]["containers"] = [container, {"name": "side", "image": "i"}]
    spec = JobSpec.parse(body["spec"])
    pod = build_pod(job="j", namespace="ns", spec=spec, phase=spec.phases[0], attempt=1,
                    resume_from=None, resume_step=None, init_from=None)
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def test_the_trainer_learns_its_ephemeral_storage_limit_only_where_it_has_one():
    env = _trainer_env({"limits": {"ephemeral-storage": "20Gi", "nvidia.com/gpu": "1"}})
    assert env[ENV_EPHEMERAL_STORAGE_MB]["valueFrom"] == {"resourceFieldRef": {
        "containerName": "trainer", "resource": "limits.ephemeral-storage", "divisor": "1M"}}
    # no limit: the downward API would give the node's allocatable, not a limit; nothing set
    assert ENV_EPHEMERAL_STORAGE_MB not in _trainer_env({"limits": {"cpu": "2"}})
    assert ENV_EPHEMERAL_STORAGE_MB not in _trainer_env(None)


def test_the_spool_limit_defaults_to_a_share_of_the_ephemeral_limit_and_the_setting_wins():
    assert spool_limit_bytes({}) is None
    assert spool_limit_bytes({ENV_EPHEMERAL_STORAGE_MB: "21475"}) == int(21475e6 * 0.8)
    assert spool_limit_bytes({ENV_EPHEMERAL_STORAGE_MB: "21475",
                              ENV_SPOOL_LIMIT_MB: "1000"}) == 1_000_000_000
    with pytest.raises(Exception, match=f"{ENV_EPHEMERAL_STORAGE_MB}='lots' is not a number"):
        spool_limit_bytes({ENV_EPHEMERAL_STORAGE_MB: "lots"})
