"""Series labelled by job go away with the job; others' stay."""
import pytest
from prometheus_client import REGISTRY

from phoenix_operator import prometheus as metrics
from phoenix_operator.config import OperatorConfig
from phoenix_operator.reconcile import Reconciler

pytestmark = pytest.mark.unit


def recoveries(ns, job):
    return REGISTRY.get_sample_value("phoenix_recoveries_total", {
        "namespace": ns, "job": job, "phase": "train", "cause": "preemption", "reason": "Evicted"})


def ages():
    return {tuple(s.labels.values()) for m in metrics.CHECKPOINT_AGE.collect() for s in m.samples}


def test_deleting_a_job_removes_its_series():
    for job in ("gone", "kept"):
        metrics.count_recovery("ns", job, "train", "preemption", "Evicted")
        metrics.set_checkpoint_time("ns", job, "train", 1.0)
    assert recoveries("ns", "gone") == 1.0
    Reconciler(kube=None, config=OperatorConfig(api_workers=1)).forget(("ns", "gone"))
    assert recoveries("ns", "gone") is None and recoveries("ns", "kept") == 1.0
    assert ("ns", "gone", "train") not in ages() and ("ns", "kept", "train") in ages()
