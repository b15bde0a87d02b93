"""The per-job gauges behind the chart's dashboard and alerts (phoenix_job_status, the
failure budget, standby failures): set from the status the leader applies, absent on a
replica that does not lead, gone with the job."""
import asyncio

import pytest
from prometheus_client import REGISTRY

from phoenix_operator.apply import Applying, metrics as apply_metrics
from phoenix_operator.config import OperatorConfig
from phoenix_operator.decide import Plan
from phoenix_operator.leader import Leadership
from phoenix_operator.phoenixjob import JobSpec, RecoverySpec
from phoenix_operator.reconcile import Reconciler

from opfacts import job

pytestmark = pytest.mark.unit

STATUS = {"phase": "Recovering", "currentPhase": "train",
          "phases": [{"name": "prep", "state": "Succeeded", "failures": 0},
                     {"name": "train", "state": "Recovering", "failures": 2,
                      "standbyFailures": 1}]}


class NotLeading(Leadership):
    def holds(self) -> bool:
        return False


def apply(reconciler: Reconciler, name: str, status: dict, recovery: dict | None = None) -> None:
    body = job(("prep", "train"), name=name)
    body["metadata"]["namespace"] = "team"
    body["spec"]["recovery"] = recovery or {}
    plan = Plan(status=status)
    asyncio.run(apply_metrics(reconciler.applier, Applying(
        job=body, spec=JobSpec.parse(body["spec"]), plan=plan, written=body)))


def value(name: str, job_name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"namespace": "team", "phoenixjob": job_name, **labels})


def test_status_budget_and_standby_failures_come_from_the_applied_status():
    r = Reconciler(kube=None, config=OperatorConfig(api_workers=1))
    apply(r, "gauged", STATUS, recovery={"maxFailures": 4})
    assert value("phoenix_job_status", "gauged", status="Recovering") == 1.0
    assert value("phoenix_job_status", "gauged", status="Running") == 0.0  # a series, at 0
    assert value("phoenix_phase_failures", "gauged", phase="train") == 2.0
    assert value("phoenix_phase_failures", "gauged", phase="prep") == 0.0
    assert value("phoenix_phase_failure_budget", "gauged", phase="train") == 4.0
    assert value("phoenix_phase_standby_failures", "gauged", phase="train") == 1.0
    apply(r, "gauged", {**STATUS, "phase": "Running"})  # no recovery: the default budget
    assert value("phoenix_job_status", "gauged", status="Recovering") == 0.0
    assert value("phoenix_job_status", "gauged", status="Running") == 1.0
    assert value("phoenix_phase_failure_budget", "gauged", phase="train") == \
        RecoverySpec.max_failures


def test_a_replica_that_does_not_lead_shows_no_stale_job_status():
    r = Reconciler(kube=None, config=OperatorConfig(api_workers=1))
    apply(r, "stale", STATUS)
    assert value("phoenix_job_status", "stale", status="Recovering") == 1.0
    r.leadership = NotLeading()  # the Lease moved: its last view would say Recovering forever
    assert value("phoenix_job_status", "stale", status="Recovering") is None
    assert value("phoenix_phase_failures", "stale", phase="train") is None
    r.leadership = Leadership()
    assert value("phoenix_job_status", "stale", status="Recovering") == 1.0


def test_deleting_the_job_removes_its_gauges():
    r = Reconciler(kube=None, config=OperatorConfig(api_workers=1))
    apply(r, "gone", STATUS)
    apply(r, "kept", STATUS)
    r.forget(("team", "gone"))
    assert value("phoenix_job_status", "gone", status="Recovering") is None
    assert value("phoenix_phase_standby_failures", "gone", phase="train") is None
    assert value("phoenix_job_status", "kept", status="Recovering") == 1.0


def test_notice_standby_and_handoff_counters_start_at_zero_and_go_with_the_job():
    r = Reconciler(kube=None, config=OperatorConfig(api_workers=1))
    apply(r, "quiet", STATUS)
    for name in ("phoenix_notices_total", "phoenix_standbys_started_total",
                 "phoenix_handoffs_total", "phoenix_standby_promotions_total"):
        assert value(name, "quiet") == 0.0, name
    r.forget(("team", "quiet"))
    assert value("phoenix_notices_total", "quiet") is None
