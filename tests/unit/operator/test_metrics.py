"""Series labelled by job go away with the job; others' stay."""
import pytest
from prometheus_client import REGISTRY

from phoenix_operator import prometheus as metrics
from phoenix_operator.config import OperatorConfig
from phoenix_operator.reconcile import Reconciler

pytestmark = pytest.mark.unit


def recoveries(ns, job):
    return REGISTRY.get_sample_value("phoenix_recoveries_total", {
        "namespace": ns, "phoenixjob": job, "phase": "train", "cause": "preemption",
        "reason": "Evicted"})


def ages():
    return {tuple(s.labels.values()) for m in metrics.CHECKPOINT_AGE.collect() for s in m.samples}


def handoffs(ns, job):
    return REGISTRY.get_sample_value("phoenix_handoffs_total",
                                     {"namespace": ns, "phoenixjob": job})


def test_deleting_a_job_removes_its_series():
    for job in ("gone", "kept"):
        metrics.count_recovery("ns", job, "train", "preemption", "Evicted")
        metrics.set_checkpoint_time("ns", job, "train", 1.0)
        metrics.count_standby_event("ns", job, "phoenix_handoffs_total")
    assert recoveries("ns", "gone") == 1.0 and handoffs("ns", "gone") == 1.0
    Reconciler(kube=None, config=OperatorConfig(api_workers=1)).forget(("ns", "gone"))
    assert recoveries("ns", "gone") is None and recoveries("ns", "kept") == 1.0
    assert handoffs("ns", "gone") is None and handoffs("ns", "kept") == 1.0
    assert ("ns", "gone", "train") not in ages() and ("ns", "kept", "train") in ages()


def test_notices_standbys_and_handoffs_are_counted_as_their_events_are_posted():
    import asyncio

    from phoenix_operator import constants as C
    from phoenix_operator.apply import Applying, metrics as count
    from phoenix_operator.decide import Note, Plan
    from phoenix_operator.phoenixjob import JobSpec

    from opfacts import job

    body = job(name="sb")
    body["metadata"]["namespace"] = "team"
    plan = Plan(status={}, events=[Note("Warning", C.EV_NOTICE, "n"),
                                   Note("Normal", C.EV_STANDBY_STARTED, "s"),
                                   Note("Normal", C.EV_HANDOFF, "h"),
                                   Note("Normal", C.EV_PROMOTED, "p"),
                                   Note("Normal", C.EV_PROMOTED, "p again"),
                                   Note("Normal", "PodCreated", "not counted here")])
    applier = Reconciler(kube=None, config=OperatorConfig(api_workers=1)).applier
    asyncio.run(count(applier, Applying(job=body, spec=JobSpec.parse(body["spec"]), plan=plan,
                                        written=body)))
    value = lambda name: REGISTRY.get_sample_value(  # noqa: E731
        name, {"namespace": "team", "phoenixjob": "sb"})
    assert [value(n) for n in ("phoenix_notices_total", "phoenix_standbys_started_total",
                               "phoenix_handoffs_total", "phoenix_standby_promotions_total")] == [
        1.0, 1.0, 1.0, 2.0]


def test_per_rank_progress_series_follow_the_running_attempt_and_go_with_the_job():
    from phoenix_operator import prometheus as P

    def series(name):
        return {tuple(s.labels.values()): s.value for m in P.REGISTRY.collect()
                for s in m.samples if s.name == name and s.labels.get("phoenixjob") == "prog"}

    P.set_progress("ns", "prog", "train", [(0, 0.1, 0.05), (1, 0.1, 0.2)], 1000.0)
    assert series("phoenix_rank_compute_seconds") == {("ns", "prog", "train", "0"): 0.05,
                                                      ("ns", "prog", "train", "1"): 0.2}
    assert series("phoenix_last_step_timestamp_seconds") == {("ns", "prog", "train"): 1000.0}
    P.set_progress("ns", "prog", "train", [(0, 0.1, None)], 1010.0)  # fewer ranks now
    assert list(series("phoenix_rank_step_seconds")) == [("ns", "prog", "train", "0")]
    assert series("phoenix_rank_compute_seconds") == {}
    P.forget_job("ns", "prog")
    assert series("phoenix_rank_step_seconds") == {} and series("phoenix_last_step_timestamp_seconds") == {}
