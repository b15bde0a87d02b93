"""The decision table: facts in, plan out. Injected clock; no cluster, no storage."""
from __future__ import annotations

import json
from datetime import datetime
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from phoenix_operator.node_health import NodeHealth
from phoenix_operator.decide import Checkpoint, Listing, decide
from phoenix_operator.phoenixjob import ts
from phoenix_operator.podspec import pod_name

from opfacts import at, job, listing, phase_status, pod, with_status
from phoenix_operator import constants as C

pytestmark = pytest.mark.unit

NO_CK = {"train": listing()}
CK_10_20 = {"train": listing(10, 20)}
CK_40 = {"train": listing(40)}  # the step opfacts' termination messages name
CK_CORRUPT = {"train": listing(10, 20, 30, invalid=(30,))}
RUN1 = phase_status()  # train Running, attempt 1


@dataclass
class Case:
    id: str
    body: dict
    pods: list = field(default_factory=list)
    listings: dict | None = None
    now: Any = at(1)
    states: dict = field(default_factory=dict)
    create: list = field(default_factory=list)
    delete: list = field(default_factory=list)
    events: list = field(default_factory=list)
    job_phase: str | None = None
    needs: set = field(default_factory=set)
    requeue: float | None = None
    check: Callable | None = None
    nodes: dict | None = None


def ps(plan, name="train"):
    return next(p for p in plan.status["phases"] if p["name"] == name)


def env_of(plan, i=0):
    return {e["name"]: e for e in plan.create[i].manifest["spec"]["containers"][0]["env"]}


CASES = [
    # --- starting ----------------------------------------------------------------------
    Case("fresh-needs-listing", job(), listings={}, states={"train": "Pending"},
         needs={"train"}, job_phase="Pending"),
    Case("fresh-start", job(), listings=NO_CK, states={"train": "Running"},
         create=["j.train-1"], events=["PodCreated"], job_phase="Running",
         check=lambda p: "PHOENIX_RESUME_FROM" not in env_of(p)
         and env_of(p)["PHOENIX_ATTEMPT"]["value"] == "1"),
    Case("recreated-job-resumes-existing", job(), listings=CK_10_20, create=["j.train-1"],
         check=lambda p: env_of(p)["PHOENIX_RESUME_FROM"]["value"].endswith("step-00000020")),
    Case("steady-running", with_status(job(), RUN1), pods=[pod()], listings={},
         states={"train": "Running"}, job_phase="Running"),
    # --- ends of an attempt --------------------------------------------------------------
    Case("succeeded", with_status(job(), RUN1), pods=[pod(pod_phase="Succeeded", exit_code=0)],
         states={"train": "Succeeded"}, events=["PhaseSucceeded", "JobSucceeded"],
         job_phase="Succeeded"),
    Case("eviction-replaced-at-once", with_status(job(), RUN1),
         pods=[pod(pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI")],
         listings=CK_10_20, states={"train": "Running"}, create=["j.train-2"],
         events=["Preempted", "Resuming"],
         check=lambda p: ps(p)["preemptions"] == 1 and ps(p)["failures"] == 0
         and ps(p)["attempts"] == 2
         and env_of(p)["PHOENIX_RESUME_FROM"]["value"] == "s3://bucket/run/train/step-00000020"
         and ps(p)["lastFailure"]["reason"] == "EvictionByEvictionAPI"),
    Case("preemption-waits-for-listing", with_status(job(), RUN1),
         pods=[pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")], listings={},
         states={"train": "Recovering"}, needs={"train"}, job_phase="Recovering"),
    Case("corrupt-newest-skipped", with_status(job(), RUN1),
         pods=[pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")], listings=CK_CORRUPT,
         create=["j.train-2"], events=["Preempted", "CheckpointSkipped", "Resuming"],
         check=lambda p: env_of(p)["PHOENIX_RESUME_FROM"]["value"].endswith("step-00000020")),
    Case("pod-deleted-is-preemption", with_status(job(), RUN1), pods=[], listings=NO_CK,
         create=["j.train-2"],
         check=lambda p: ps(p)["lastFailure"]["reason"] == "PodDeleted"),
    Case("deleted-by-others-terminating-waits", with_status(job(), RUN1),
         pods=[pod(deletion=at(0))], listings=NO_CK, states={"train": "Running"}),
    Case("sigkill-on-lost-node-is-preemption", with_status(job(), RUN1),
         pods=[pod(pod_phase="Failed", exit_code=137, node="n1")],
         nodes={"n1": NodeHealth(missing=True)}, listings=NO_CK, create=["j.train-2"],
         check=lambda p: ps(p)["lastFailure"]["reason"] == "NodeLost"),
    # 137/143 alone: a liveness probe, activeDeadlineSeconds or the trainer itself. With
    # unlimited preemptions, counting it as one would retry it forever.
    Case("bare-sigkill-is-a-failure-and-backs-off", with_status(job(), RUN1),
         pods=[pod(pod_phase="Failed", exit_code=137, node="n1")], nodes={"n1": NodeHealth()},
         listings=NO_CK, states={"train": "Recovering"}, events=["AttemptFailed"],
         requeue=9.0, check=lambda p: ps(p)["failures"] == 1 and ps(p)["preemptions"] == 0
         and ps(p)["lastFailure"]["reason"] == "SIGKILL"),
    Case("bare-sigterm-exhausts-the-failure-budget", with_status(job(), phase_status(
        attempts=3, failures=2)), pods=[pod(attempt=3, pod_phase="Failed", exit_code=143)],
        listings=NO_CK, states={"train": "Failed"}, job_phase="Failed",
        check=lambda p: "maxFailures=2" in _cond(p, "Failed")["message"]),
    Case("failure-backs-off", with_status(job(), RUN1),
         pods=[pod(pod_phase="Failed", exit_code=1, finished=at(0))], listings=NO_CK, now=at(1),
         states={"train": "Recovering"}, events=["AttemptFailed"], requeue=9.0,
         job_phase="Recovering",
         check=lambda p: ps(p)["failures"] == 1 and ps(p)["nextAttemptAt"] == ts(at(10))
         and ps(p)["lastFailure"]["exitCode"] == 1),
    Case("backoff-not-elapsed", with_status(job(), phase_status(
        state="Recovering", failures=1, nextAttemptAt=ts(at(10)))),
        pods=[pod(pod_phase="Failed", exit_code=1)], listings=NO_CK, now=at(5), requeue=5.0,
        states={"train": "Recovering"}),
    Case("backoff-elapsed-replaces", with_status(job(), phase_status(
        state="Recovering", failures=1, nextAttemptAt=ts(at(10)))),
        pods=[pod(pod_phase="Failed", exit_code=1)], listings=NO_CK, now=at(10),
        create=["j.train-2"]),
    Case("second-failure-doubles-backoff", with_status(job(), phase_status(
        attempts=2, failures=1)), pods=[pod(attempt=2, pod_phase="Failed", exit_code=1,
                                            finished=at(100))],
        listings=NO_CK, now=at(100), requeue=20.0,
        check=lambda p: ps(p)["nextAttemptAt"] == ts(at(120))),
    Case("backoff-capped", with_status(job(recovery={"maxFailures": 50, "backoff": {
        "initialSeconds": 10, "maxSeconds": 60}}), phase_status(attempts=9, failures=8)),
        pods=[pod(attempt=9, pod_phase="Failed", exit_code=1, finished=at(0))],
        listings=NO_CK, now=at(0), requeue=60.0,
        check=lambda p: ps(p)["nextAttemptAt"] == ts(at(60))),
    Case("failures-exhausted", with_status(job(), phase_status(attempts=3, failures=2)),
         pods=[pod(attempt=3, pod_phase="Failed", exit_code=1, term_reason="failed",
                   message="loss is NaN")],
         listings=NO_CK, states={"train": "Failed"},
         events=["BudgetExhausted", "PhaseFailed", "JobFailed"], job_phase="Failed",
         check=lambda p: "maxFailures=2" in _cond(p, "Failed")["message"]
         and "loss is NaN" in _cond(p, "Failed")["message"]
         and _cond(p, "Failed")["status"] == "True"),
    Case("preemption-spares-failure-budget", with_status(job(), phase_status(
        attempts=3, failures=2)), pods=[pod(attempt=3, pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")],
        listings=CK_40, create=["j.train-4"],
        check=lambda p: ps(p)["failures"] == 2 and ps(p)["preemptions"] == 1),
    Case("preemptions-exhausted", with_status(job(recovery={"maxPreemptions": 1}), phase_status(
        attempts=2, preemptions=1)), pods=[pod(attempt=2, pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")],
        listings=NO_CK, states={"train": "Failed"}, job_phase="Failed",
        check=lambda p: "maxPreemptions=1" in _cond(p, "Failed")["message"]),
    Case("oom-is-failure", with_status(job(), RUN1),
         pods=[pod(pod_phase="Failed", exit_code=137, reason="OOMKilled")], listings=NO_CK,
         states={"train": "Recovering"}, requeue=9.0, check=lambda p: ps(p)["failures"] == 1),
    Case("image-error-deletes-and-waits", with_status(job(), RUN1),
         pods=[pod(pod_phase="Pending", waiting="ImagePullBackOff")], listings=NO_CK, now=at(60),
         delete=["j.train-1"], states={"train": "Recovering"}, requeue=10.0),
    Case("old-pod-still-live-no-second-pod", with_status(job(), phase_status(
        state="Recovering", failures=1, nextAttemptAt=ts(at(0)))),
        pods=[pod(pod_phase="Pending", waiting="ImagePullBackOff", deletion=at(0))],
        listings=NO_CK, states={"train": "Recovering"}),
    # --- node loss: the pod still looks Running, its node says otherwise -----------------
    Case("node-missing-force-deletes-and-replaces-at-once", with_status(job(), RUN1),
         pods=[pod(node="n1")], nodes={"n1": NodeHealth(missing=True)}, listings=CK_10_20,
         states={"train": "Running"}, create=["j.train-2"], delete=["j.train-1"],
         events=["Preempted", "Resuming"], job_phase="Running",
         check=lambda p: ps(p)["preemptions"] == 1 and ps(p)["failures"] == 0
         and ps(p)["attempts"] == 2 and ps(p)["lastFailure"]["reason"] == "NodeLost"
         and ps(p)["lastFailure"]["cause"] == "preemption"
         and ps(p)["lastFailure"]["time"] == ts(at(1))
         and [(d.grace_seconds, d.force) for d in p.delete] == [(0, True)]
         and env_of(p)["PHOENIX_RESUME_FROM"]["value"].endswith("step-00000020")),
    Case("node-missing-needs-listing-deletes-anyway", with_status(job(), RUN1),
         pods=[pod(node="n1")], nodes={"n1": NodeHealth(missing=True)}, listings={},
         states={"train": "Recovering"}, delete=["j.train-1"], needs={"train"},
         job_phase="Recovering"),
    # NotReady but present: the kubelet may be partitioned, its trainer still writing. Not
    # replaced (two attempts on one prefix) until the Node goes or is tainted out-of-service.
    Case("node-not-ready-past-grace-is-stranded-not-replaced", with_status(job(), RUN1),
         pods=[pod(node="n1")], nodes={"n1": NodeHealth(not_ready_since=at(-41))},
         listings=NO_CK, now=at(0), states={"train": "Running"}, events=["NodeNotReady"],
         check=lambda p: ps(p)["preemptions"] == 0 and not p.delete
         and _cond(p, "Running")["reason"] == "NodeNotReady"
         and "out-of-service" in _cond(p, "Running")["message"]),
    Case("node-out-of-service-force-deletes-and-replaces", with_status(job(), RUN1),
         pods=[pod(node="n1")],
         nodes={"n1": NodeHealth(not_ready_since=at(-10), out_of_service=True)},
         listings=NO_CK, now=at(0), create=["j.train-2"], delete=["j.train-1"],
         events=["Preempted"],
         check=lambda p: ps(p)["lastFailure"]["reason"] == "NodeLost"
         and "out-of-service" in ps(p)["lastFailure"]["message"] and ps(p)["preemptions"] == 1
         and [(d.grace_seconds, d.force) for d in p.delete] == [(0, True)]),
    Case("node-not-ready-within-grace-waits", with_status(job(), RUN1),
         pods=[pod(node="n1")], nodes={"n1": NodeHealth(not_ready_since=at(-10))},
         listings={}, now=at(0), states={"train": "Running"}, requeue=30.0,
         check=lambda p: ps(p)["preemptions"] == 0 and not p.events),
    Case("node-healthy-steady", with_status(job(), RUN1), pods=[pod(node="n1")],
         nodes={"n1": NodeHealth()}, listings={}, states={"train": "Running"}),
    Case("node-of-other-pod-missing", with_status(job(), RUN1), pods=[pod(node="n1")],
         nodes={"n2": NodeHealth(missing=True)}, listings={}, states={"train": "Running"}),
    Case("node-missing-under-intent-old-pod-deleted-first",
         with_status(job(), phase_status(attempts=2, podUID=None, preemptions=1)),
         pods=[pod(attempt=1, node="n1")], nodes={"n1": NodeHealth(missing=True)},
         listings=NO_CK, states={"train": "Running"}, create=["j.train-2"],
         delete=["j.train-1"], check=lambda p: ps(p)["preemptions"] == 1),
    Case("node-missing-while-suspending", with_status(job(suspend=True), phase_status(
        state="Suspended")), pods=[pod(node="n1", deletion=at(0))],
        nodes={"n1": NodeHealth(missing=True)}, listings={}, states={"train": "Suspended"},
        delete=["j.train-1"], check=lambda p: ps(p)["preemptions"] == 0),
    Case("node-missing-exhausts-preemptions", with_status(
        job(recovery={"maxPreemptions": 0}), RUN1), pods=[pod(node="n1")],
        nodes={"n1": NodeHealth(missing=True)}, listings={}, states={"train": "Failed"},
        delete=["j.train-1"], job_phase="Failed",
        check=lambda p: "maxPreemptions=0" in _cond(p, "Failed")["message"]),
    # --- restarts and double delivery ---------------------------------------------------
    Case("intent-written-pod-never-created", with_status(job(), phase_status(podUID=None)),
         pods=[], listings=CK_10_20, states={"train": "Running"}, create=["j.train-1"],
         check=lambda p: ps(p)["preemptions"] == 0 and ps(p)["attempts"] == 1
         and "podUID" not in ps(p)),
    Case("intent-needs-listing", with_status(job(), phase_status(podUID=None)),
         pods=[], listings={}, needs={"train"}, states={"train": "Running"}),
    Case("pod-uid-recorded-once-seen", with_status(job(), phase_status(podUID=None)),
         pods=[pod()], listings={}, check=lambda p: ps(p)["podUID"] == "uid-j.train-1"),
    Case("lost-status-write-adopts", with_status(job(), RUN1),
         pods=[pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI"), pod(attempt=2)], listings={},
         states={"train": "Running"}, events=["Preempted", "PodAdopted"],
         check=lambda p: ps(p)["attempts"] == 2 and ps(p)["preemptions"] == 1),
    Case("recovering-adopts-existing", with_status(job(), phase_status(state="Recovering")),
         pods=[pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI"), pod(attempt=2)], listings={},
         states={"train": "Running"}, check=lambda p: ps(p)["attempts"] == 2),
    Case("pending-adopts-existing", job(), pods=[pod()], listings={},
         states={"train": "Running"}, events=["PodAdopted"]),
    Case("adopted-pod-already-ended", with_status(job(), RUN1),
         pods=[pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI"), pod(attempt=2, pod_phase="Failed",
                                                            exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")],
         listings=CK_40, create=["j.train-3"],
         check=lambda p: ps(p)["preemptions"] == 2),
    # --- checkpoint fallback ----------------------------------------------------------
    Case("repeated-crash-falls-back", with_status(job(), phase_status(
        attempts=2, failures=1, consecutiveFailuresAtCheckpoint=1,
        resumeFrom="s3://bucket/run/train/step-00000020")),
        pods=[pod(attempt=2, pod_phase="Failed", exit_code=1, finished=at(0))],
        listings=CK_10_20, now=at(100), create=["j.train-3"],
        events=["AttemptFailed", "CheckpointFallback", "Resuming"],
        check=lambda p: env_of(p)["PHOENIX_RESUME_FROM"]["value"].endswith("step-00000010")
        and ps(p)["skippedSteps"] == [20]),
    Case("single-crash-no-fallback", with_status(job(), phase_status(
        attempts=2, resumeFrom="s3://bucket/run/train/step-00000020")),
        pods=[pod(attempt=2, pod_phase="Failed", exit_code=1, finished=at(0))],
        listings=CK_10_20, now=at(100), create=["j.train-3"],
        check=lambda p: env_of(p)["PHOENIX_RESUME_FROM"]["value"].endswith("step-00000020")),
    Case("new-checkpoint-resets-crash-count", with_status(job(), phase_status(
        attempts=2, consecutiveFailuresAtCheckpoint=0,
        resumeFrom="s3://bucket/run/train/step-00000010")),
        pods=[pod(attempt=2, pod_phase="Failed", exit_code=1, finished=at(0))],
        listings=CK_10_20, now=at(100), create=["j.train-3"],
        check=lambda p: ps(p)["consecutiveFailuresAtCheckpoint"] == 0
        and env_of(p)["PHOENIX_RESUME_FROM"]["value"].endswith("step-00000020")),
    Case("storage-error-retries", with_status(job(), phase_status(state="Recovering")),
         pods=[pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")],
         listings={"train": Listing(error="connection refused")}, requeue=15.0,
         events=["StorageError"], states={"train": "Recovering"}),
    # --- phases -------------------------------------------------------------------------
    Case("next-phase-starts-with-init-from",
         with_status(job(("train", "finetune")), RUN1),
         pods=[pod(pod_phase="Succeeded", exit_code=0)],
         listings={"train": listing(10, 20), "finetune": listing(phase="finetune")},
         states={"train": "Succeeded", "finetune": "Running"}, create=["j.finetune-1"],
         check=lambda p: env_of(p)["PHOENIX_INIT_FROM"]["value"]
         == "s3://bucket/run/train/step-00000020"
         and env_of(p)["PHOENIX_CHECKPOINT_URI"]["value"] == "s3://bucket/run/finetune"),
    Case("dependent-waits", job(("train", "finetune")), listings={"train": listing()},
         states={"train": "Running", "finetune": "Pending"}, create=["j.train-1"]),
    Case("failed-phase-blocks-dependents-eval-runs",
         with_status(job(("train", "finetune", "eval"), independent=("eval",),
                         depends={"eval": ["train"]}),
                     phase_status(attempts=3, failures=2)),
         pods=[pod(attempt=3, pod_phase="Failed", exit_code=1)],
         listings={"train": listing(10), "eval": listing(phase="eval")},
         states={"train": "Failed", "finetune": "Blocked", "eval": "Running"},
         create=["j.eval-1"], events=["PhaseBlocked"], job_phase="Running"),
    Case("job-failed-when-all-terminal",
         with_status(job(("train", "finetune")), phase_status(attempts=3, failures=2)),
         pods=[pod(attempt=3, pod_phase="Failed", exit_code=1)], listings={},
         states={"train": "Failed", "finetune": "Blocked"}, job_phase="Failed",
         check=lambda p: "blocked: finetune" in _cond(p, "Failed")["message"]),
    Case("succeeded-never-reruns",
         with_status(job(("train", "eval")), phase_status(state="Succeeded"),
                     phase_status(name="eval", state="Succeeded")),
         pods=[], listings={}, job_phase="Succeeded"),
    # --- suspend ------------------------------------------------------------------------
    Case("suspend-deletes-pod", with_status(job(suspend=True), RUN1), pods=[pod()],
         listings={}, delete=["j.train-1"], states={"train": "Suspended"},
         events=["Suspending"], job_phase="Suspended"),
    Case("suspend-pod-ended-not-charged", with_status(job(suspend=True), phase_status(
        state="Suspended")), pods=[pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")],
        listings={}, states={"train": "Suspended"},
        check=lambda p: ps(p)["preemptions"] == 0 and ps(p)["lastCheckpoint"]["step"] == 40),
    Case("suspend-terminating-not-deleted-twice", with_status(job(suspend=True), phase_status(
        state="Suspended")), pods=[pod(deletion=at(0))], listings={}),
    Case("suspend-while-backing-off", with_status(job(suspend=True), phase_status(
        state="Recovering", failures=1, nextAttemptAt=ts(at(100)))),
        pods=[pod(pod_phase="Failed", exit_code=1)], listings=NO_CK,
        states={"train": "Suspended"}, job_phase="Suspended"),
    Case("suspend-pending-does-not-start", job(suspend=True), listings=NO_CK,
         states={"train": "Pending"}, job_phase="Suspended"),
    Case("unsuspend-waits-for-old-pod", with_status(job(), phase_status(state="Suspended")),
         pods=[pod(deletion=at(0))], listings=NO_CK, states={"train": "Suspended"}),
    Case("unsuspend-replaces", with_status(job(), phase_status(state="Suspended")),
         pods=[pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")], listings=CK_10_20,
         create=["j.train-2"], events=["Unsuspended", "Resuming"],
         check=lambda p: ps(p)["preemptions"] == 0),
    Case("suspended-pod-completed", with_status(job(suspend=True), phase_status(
        state="Suspended")), pods=[pod(pod_phase="Succeeded", exit_code=0)], listings={},
        states={"train": "Succeeded"}, job_phase="Succeeded"),
]


def _cond(plan, type_):
    return next(c for c in plan.status["conditions"] if c["type"] == type_)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision_table(case: Case):
    plan = decide(case.body, case.pods, case.listings or {}, case.now, case.nodes)
    states = {p["name"]: p["state"] for p in plan.status["phases"]}
    for name, state in case.states.items():
        assert states[name] == state, (name, states)
    assert [c.name for c in plan.create] == case.create
    assert [d.name for d in plan.delete] == case.delete
    reasons = [e.reason for e in plan.events]
    for reason in case.events:
        assert reason in reasons, reasons
    if case.job_phase:
        assert plan.status["phase"] == case.job_phase
    assert plan.needs_checkpoints == case.needs
    assert plan.requeue_after == case.requeue
    if case.check:
        assert case.check(plan)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide_is_deterministic(case: Case):
    a = decide(case.body, case.pods, case.listings or {}, case.now, case.nodes)
    b = decide(case.body, case.pods, case.listings or {}, case.now, case.nodes)
    assert a == b


def test_steady_state_status_is_a_fixed_point():
    """Applying a plan's status and deciding again later changes nothing: no status write
    per reconcile (conditions keep their lastTransitionTime)."""
    body = job()
    body["status"] = decide(body, [], NO_CK, at(0)).status
    plan = decide(body, [pod()], {}, at(1))  # records the pod's uid: one more write
    body["status"] = plan.status
    again = decide(body, [pod()], {}, at(500))
    assert again.status == plan.status
    assert not again.create and not again.events


def test_replacement_records_time_of_previous_end():
    plan = decide(with_status(job(), RUN1), [pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI",
                                                 finished=at(-3))], CK_40, at(1))
    assert plan.create[0].previous_end == at(-3)
    assert plan.create[0].previous_cause == "preemption"
    assert [r.cause for r in plan.recoveries] == ["preemption"]


def test_pod_env_contract_never_holds_secret_values():
    plan = decide(job(), [], CK_10_20, at(0))
    env = env_of(plan)
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {
        "secretKeyRef": {"name": "creds", "key": "AWS_ACCESS_KEY_ID"}}}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://127.0.0.1:9000"
    assert env["PHOENIX_CHECKPOINT_URI"]["value"] == "s3://bucket/run/train"
    assert env["PHOENIX_JOB_NAME"]["value"] == "j"
    spec = plan.create[0].manifest["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] == 30
    labels = plan.create[0].manifest["metadata"]["labels"]
    assert labels["phoenix.dev/attempt"] == "1" and labels["phoenix.dev/phase"] == "train"


def test_trainer_pods_get_no_service_account_token_unless_the_template_asks():
    plan = decide(job(), [], CK_10_20, at(0))
    assert plan.create[0].manifest["spec"]["automountServiceAccountToken"] is False
    body = job()
    body["spec"]["template"]["spec"]["automountServiceAccountToken"] = True
    plan = decide(body, [], CK_10_20, at(0))
    assert plan.create[0].manifest["spec"]["automountServiceAccountToken"] is True


def test_phase_args_and_env_override_template():
    body = job()
    body["spec"]["phases"][0].update(args=["--lr", "1"], env=[{"name": "X", "value": "2"}])
    body["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "X", "value": "1"}]
    plan = decide(body, [], NO_CK, at(0))
    c = plan.create[0].manifest["spec"]["containers"][0]
    assert c["args"] == ["--lr", "1"]
    assert env_of(plan)["X"]["value"] == "2"


def test_recovering_condition_explains_backoff():
    plan = decide(with_status(job(), RUN1), [pod(pod_phase="Failed", exit_code=1)], NO_CK, at(1))
    cond = _cond(plan, "Recovering")
    assert cond["status"] == "True" and cond["reason"] == "BackingOff"
    assert "next attempt at" in cond["message"]


def test_every_transition_in_the_table_is_exercised(monkeypatch):
    """The decision table above reaches every legal edge of the state machine."""
    from phoenix_operator.decide import attempts, gangs, phases, standby
    from phoenix_operator import reset as reset_module
    from phoenix_operator.phoenixjob import JobSpec
    from phoenix_operator.states import TRANSITIONS, transition

    seen = set()

    def spy(state, event):
        seen.add((state, event))
        return transition(state, event)

    for module in (phases, attempts, gangs, standby):  # decide's modules that move states
        monkeypatch.setattr(module, "transition", spy)
    monkeypatch.setattr(reset_module, "transition", spy)
    for case in CASES:
        decide(case.body, case.pods, case.listings or {}, case.now, case.nodes)
    # the user's way out of Failed/Blocked (`phoenixctl reset`)
    body = with_status(job(("train", "finetune")), phase_status(state="Failed"),
                       {"name": "finetune", "state": "Blocked"})
    reset_module.reset_status(JobSpec.parse(body["spec"]), body["status"])
    assert set(TRANSITIONS) - seen == set()


# --- a pod name taken by a pod this job does not own ---------------------------------------
FOREIGN = {pod_name("j", "train", 2): "owned by ReplicaSet web-1 (uid r-1)"}
INTENT_2 = phase_status(attempts=2, podUID=None, preemptions=1)


def test_foreign_pod_gives_a_condition_not_a_create():
    plan = decide(with_status(job(), INTENT_2), [pod(pod_phase="Failed", exit_code=143)],
                  NO_CK, at(1), foreign=FOREIGN)
    assert plan.create == [] and plan.delete == []
    cond = _cond(plan, "PodConflict")
    assert cond["status"] == "True" and cond["reason"] == "ForeignPod"
    assert "ns/j.train-2" in cond["message"] and "ReplicaSet web-1" in cond["message"]
    assert [e.reason for e in plan.events] == ["PodConflict"]
    assert plan.requeue_after == 30.0
    assert ps(plan)["state"] == "Running" and ps(plan)["attempts"] == 2


def test_foreign_pod_event_is_posted_once_and_the_condition_clears():
    body = with_status(job(), INTENT_2)
    body["status"] = decide(body, [], NO_CK, at(1), foreign=FOREIGN).status
    again = decide(body, [], NO_CK, at(31), foreign=FOREIGN)
    assert again.events == [] and again.create == []
    assert _cond(again, "PodConflict")["lastTransitionTime"] == ts(at(1))
    gone = decide(body, [], NO_CK, at(61))  # the foreign pod was deleted
    assert [c.name for c in gone.create] == ["j.train-2"]
    assert _cond(gone, "PodConflict")["status"] == "False"


@pytest.mark.parametrize("a,b", [(("a-b", "c"), ("a", "b-c")), (("a", "b-1"), ("a-b", "1")),
                                 (("x.y", "z"), ("x", "y-z"))])
def test_pod_names_cannot_collide(a, b):
    """``<job>-<phase>-<attempt>`` gave job a-b phase c and job a phase b-c the same pod."""
    assert pod_name(*a, 1) != pod_name(*b, 1)
    assert pod_name("a", "b", 11) != pod_name("a", "b-1", 1)


def test_pod_hostname_is_a_dns_label():
    from phoenix_operator.podspec import pod_hostname

    name = pod_name("x" * 40 + ".y", "phase-" + "p" * 24, 12)
    host = pod_hostname(name)
    assert len(host) <= 63 and "." not in host and not host.endswith("-")


def test_phase_switch_deletes_the_previous_phases_step_and_checkpoint_time():
    """status is a merge patch: a key left out survives, so the Step and Checkpoint age
    columns went on showing pretrain's checkpoint while finetune ran. null deletes it."""
    done = phase_status("pretrain", attempts=1, lastCheckpoint={
        "uri": "s3://bucket/run/pretrain/step-100", "step": 100, "time": ts(at(0))})
    body = with_status(job(phases=("pretrain", "finetune")), done)
    body["status"].update(step=100, lastCheckpointTime=ts(at(0)), currentPhase="pretrain")
    pods = [pod("pretrain", pod_phase="Succeeded", exit_code=0)]
    plan = decide(body, pods, {"finetune": listing(phase="finetune"),
                               "pretrain": listing(100, phase="pretrain")}, at(5))
    assert plan.status["currentPhase"] == "finetune"
    assert plan.status["step"] is None and plan.status["lastCheckpointTime"] is None
    body["status"] = {k: v for k, v in plan.status.items() if v is not None}  # as the API keeps it
    again = decide(body, pods + [pod("finetune")], {}, at(6))
    assert "step" not in again.status and "lastCheckpointTime" not in again.status


def test_stranded_pod_event_is_posted_once():
    body = with_status(job(), RUN1)
    nodes = {"n1": NodeHealth(not_ready_since=at(-41))}
    body["status"] = decide(body, [pod(node="n1")], {}, at(0), nodes).status
    again = decide(body, [pod(node="n1")], {}, at(300), nodes)
    assert again.events == [] and again.status == body["status"] and not again.delete


def _said(p, exact: bool, why: str = ""):
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    term["message"] = json.dumps({**json.loads(term["message"]), "resumeExact": exact,
                                  "resumeExactReason": why})
    return p


def test_resume_exact_condition_follows_the_trainers_verdict():
    body = with_status(job(), RUN1)
    assert not any(c["type"] == "ResumeExact" for c in decide(body, [pod()], {}, at(0)).status["conditions"])
    ended = _said(pod(pod_phase="Failed", exit_code=143, term_reason="preempted",
                      disruption="EvictionByEvictionAPI"), False, "sampler Opaque has no generator")
    plan = decide(body, [ended], NO_CK, at(1))
    cond = _cond(plan, "ResumeExact")
    assert (cond["status"], cond["reason"]) == ("False", "ResumeNotExact")
    assert "phase train: sampler Opaque has no generator" == cond["message"]
    assert ps(plan)["resumeExact"] is False and "Opaque" in ps(plan)["resumeExactReason"]
    assert [e.reason for e in plan.events].count("ResumeNotExact") == 1
    body["status"] = plan.status
    again = decide(body, [ended, pod(attempt=2)], {}, at(5))
    assert "ResumeNotExact" not in [e.reason for e in again.events]
    assert _cond(again, "ResumeExact")["lastTransitionTime"] == ts(at(1))


def test_resume_exact_from_the_chosen_checkpoints_manifest():
    ck = Checkpoint(step=20, uri="s3://bucket/run/train/step-20", valid=True, resume_exact=True)
    plan = decide(with_status(job(), RUN1), [pod(pod_phase="Failed", exit_code=143,
                                                 disruption="EvictionByEvictionAPI")],
                  {"train": Listing((ck,))}, at(1))
    assert plan.create and _cond(plan, "ResumeExact")["status"] == "True"
    assert ps(plan)["resumeExact"] is True


# --- gangs ----------------------------------------------------------------------------------
def gang_job(replicas=2, **kw):
    body = job(**kw)
    body["spec"]["phases"][0]["replicas"] = replicas
    body["spec"]["phases"][0]["nprocPerNode"] = 2
    return body


def member(i, attempt=1, node="spot-1", **kw):
    p = pod(attempt=attempt, node=node, **kw)
    name = pod_name("j", "train", attempt, i)
    p["metadata"].update(name=name, uid=f"uid-{name}")
    p["metadata"]["labels"][C.LABEL_MEMBER] = str(i)
    p["metadata"]["creationTimestamp"] = ts(at(0))
    return p


GANG_RUN1 = phase_status(pod="j.train-1.0", podUID="uid-j.train-1.0")


def test_gang_starts_all_members_with_torchrun_env_and_a_headless_service():
    plan = decide(gang_job(), [], NO_CK, at(0))
    names = [c.name for c in plan.create]
    assert names == ["j.train-1.0", "j.train-1.1"] and ps(plan)["pod"] == "j.train-1.0"
    svc = plan.services[0]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    for i, c in enumerate(plan.create):
        spec = c.manifest["spec"]
        assert spec["hostname"] == f"train-{i}" and spec["subdomain"] == svc["metadata"]["name"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["PET_NNODES"] == "2" and env["PET_NODE_RANK"] == str(i)
        assert env["PET_NPROC_PER_NODE"] == "2" and env["PET_MASTER_PORT"] == "29500"
        assert env["PET_MASTER_ADDR"] == f"train-0.{svc['metadata']['name']}.ns.svc"
        assert c.manifest["metadata"]["labels"][C.LABEL_MEMBER] == str(i)
    assert [c.previous_end is None for c in plan.create] == [True, True]


def test_one_preempted_member_ends_the_gang_once_and_its_peers_are_not_charged():
    body = with_status(gang_job(), GANG_RUN1)
    evicted = member(1, pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                     finished=at(-5))
    peer_lost = member(0, pod_phase="Failed", exit_code=1, message="peer vanished", finished=at(-2))
    for pods in ([member(0), evicted], [peer_lost, evicted]):
        plan = decide(body, pods, NO_CK, at(1))
        st = ps(plan)
        assert (st["preemptions"], st["failures"]) == (1, 0), st
        assert st["lastFailure"]["pod"] == "j.train-1.1"
        assert [r.cause for r in plan.recoveries] == ["preemption"]
    # the live peer is deleted with its grace; the next attempt waits for it to be gone
    plan = decide(body, [member(0), evicted], NO_CK, at(1))
    assert [(d.name, d.grace_seconds) for d in plan.delete] == [("j.train-1.0", 30)]
    assert plan.create == [] and ps(plan)["state"] == "Recovering"
    body["status"] = plan.status
    assert decide(body, [member(0), evicted], NO_CK, at(2)).create == []
    again = decide(body, [evicted], NO_CK, at(3))
    assert [c.name for c in again.create] == ["j.train-2.0", "j.train-2.1"]


def test_a_failed_member_is_one_failure_naming_it_and_a_gang_succeeds_only_whole():
    body = with_status(gang_job(), GANG_RUN1)
    failed = member(0, pod_phase="Failed", exit_code=1, message="bug", finished=at(-5))
    # an error while the peer still runs: charged once GANG_SETTLE_SECONDS have passed (or
    # the peer ended too), not before
    early = decide(body, [failed, member(1)], NO_CK, at(1))
    assert (ps(early)["failures"], ps(early)["preemptions"]) == (0, 0) and early.delete == []
    assert early.requeue_after == pytest.approx(C.GANG_SETTLE_SECONDS - 6)
    both = member(1, pod_phase="Failed", exit_code=1, message="peer gone", finished=at(-4))
    for pods, now in (([failed, member(1)], at(C.GANG_SETTLE_SECONDS)), ([failed, both], at(1))):
        plan = decide(body, pods, NO_CK, now)
        assert (ps(plan)["failures"], ps(plan)["preemptions"]) == (1, 0)
        assert ps(plan)["lastFailure"]["pod"] == "j.train-1.0"
    done = [member(i, pod_phase="Succeeded", exit_code=0) for i in range(2)]
    assert ps(decide(body, done[:1] + [member(1)], {}, at(1)))["state"] == "Running"
    assert ps(decide(body, done, {}, at(1)))["state"] == "Succeeded"


def test_a_member_whose_collective_failed_before_its_peer_s_node_loss_is_known_is_not_charged():
    """The peer's node vanished: this member's collective failed at once (exit 1); the node's
    loss is known only seconds later. Within GANG_SETTLE_SECONDS it is the peer's
    preemption, not this member's failure."""
    body = with_status(gang_job(), GANG_RUN1)
    saw_it = member(0, pod_phase="Failed", exit_code=1, message="peer vanished", finished=at(-3))
    on_lost = member(1, node="n1")  # still Running: its kubelet died with the node
    assert ps(decide(body, [saw_it, on_lost], NO_CK, at(1)))["failures"] == 0
    plan = decide(body, [saw_it, on_lost], NO_CK, at(4), nodes={"n1": NodeHealth(missing=True)})
    st = ps(plan)
    assert (st["preemptions"], st["failures"]) == (1, 0), st
    assert (st["lastFailure"]["pod"], st["lastFailure"]["reason"]) == ("j.train-1.1", C.R_NODE_LOST)
    # a member killed by a signal is a cause, not a symptom: no wait
    killed = member(0, pod_phase="Failed", exit_code=137, finished=at(-3))
    assert ps(decide(body, [killed, member(1)], NO_CK, at(1)))["failures"] == 1


def test_a_member_deleted_by_someone_is_a_preemption_naming_it():
    body = with_status(gang_job(), GANG_RUN1)
    plan = decide(body, [member(0)], NO_CK, at(1))
    assert ps(plan)["preemptions"] == 1 and ps(plan)["lastFailure"]["pod"] == "j.train-1.1"
    assert ps(plan)["lastFailure"]["reason"] == C.R_POD_DELETED


def test_a_gang_not_scheduled_in_time_is_released_without_charge():
    body = with_status(gang_job(), GANG_RUN1)
    body["spec"]["recovery"]["gangScheduleTimeoutSeconds"] = 60
    waiting = [member(0), member(1, node=None, pod_phase="Pending")]
    early = decide(body, waiting, {}, at(30))
    assert early.delete == [] and early.requeue_after == 30
    plan = decide(body, waiting, {}, at(61))
    st = ps(plan)
    assert (st["state"], st["preemptions"], st["failures"]) == ("Recovering", 0, 0)
    assert {d.name for d in plan.delete} == {"j.train-1.0", "j.train-1.1"}
    cond = _cond(plan, "Recovering")
    assert cond["reason"] == "GangUnschedulable" and "j.train-1.1" in cond["message"]
    assert [e.reason for e in plan.events] == ["GangUnschedulable"]
    body["status"] = plan.status
    assert decide(body, [], NO_CK, at(100)).create == []  # waits the same time again
    assert len(decide(body, [], NO_CK, at(122)).create) == 2


# --- issue 22, item 3: preemptions that never reach the trainer are bounded -----------------
def _refused(attempt: int, when: float, reason: str = "OutOfnvidia.com/gpu"):
    p = pod(attempt=attempt, pod_phase="Failed", status_reason=reason, finished=at(when))
    p["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ContainerCreating"}}
    p["metadata"]["creationTimestamp"] = ts(at(when))
    return p


def test_preemptions_before_training_ever_started_back_off_then_become_failures():
    """A kubelet that keeps refusing the pod for capacity (or evictions before the trainer
    ever runs) made a new pod every pass. The first is replaced at once, the next ones back
    off like failures, and the MAX_UNSTARTED_PREEMPTIONS-th in a row is charged as a
    NeverStarted failure whose message says what to fix."""
    body = with_status(job(recovery={"maxFailures": 0, "backoff": {"initialSeconds": 10,
                                                                    "maxSeconds": 60}}),
                       phase_status())
    now, delays = 0.0, []
    for attempt in range(1, C.MAX_UNSTARTED_PREEMPTIONS + 1):
        plan = decide(body, [_refused(attempt, now)], NO_CK, at(now))
        st = ps(plan)
        body = {**body, "status": plan.status}
        if st["state"] == "Failed":
            break
        if plan.create:
            delays.append(0.0)
        else:
            assert st["state"] == "Recovering" and "nextAttemptAt" in st, st
            due = (datetime.fromisoformat(st["nextAttemptAt"].replace("Z", "+00:00"))
                   - at(now)).total_seconds()
            delays.append(due)
            now += due
            plan = decide(body, [_refused(attempt, now - due)], NO_CK, at(now))
            body = {**body, "status": plan.status}
            assert [c.name for c in plan.create] == [f"j.train-{attempt + 1}"], plan.status
        now += 1.0
    assert delays[0] == 0.0 and all(d > 0 for d in delays[1:]), delays
    assert delays[1:] == sorted(delays[1:]), delays  # growing
    assert st["state"] == "Failed", st
    assert st["lastFailure"]["reason"] == C.R_NEVER_STARTED
    assert "OutOfnvidia.com/gpu" in st["lastFailure"]["message"]
    assert st["preemptions"] == C.MAX_UNSTARTED_PREEMPTIONS - 1 and st["failures"] == 1


def test_an_attempt_that_started_resets_the_unstarted_count():
    body = with_status(job(), phase_status(attempts=3, preemptions=2, unstartedPreemptions=2))
    plan = decide(body, [pod(attempt=3, pod_phase="Failed", exit_code=143,
                             disruption="EvictionByEvictionAPI")], NO_CK, at(1))
    assert "unstartedPreemptions" not in ps(plan) and [c.name for c in plan.create] == ["j.train-4"]


# --- issue 22, item 7: what comes from storage or a pod is bounded where it is copied -------
LONG = "why " * 2000  # 8,000 characters: the CRD allows 1,100 for resumeExactReason


def _reason_fits(plan):
    st = ps(plan)
    assert len(st["resumeExactReason"]) <= 1100, len(st["resumeExactReason"])
    cond = next(c for c in plan.status["conditions"] if c["type"] == "ResumeExact")
    assert len(cond["message"]) <= 1100 + 100, len(cond["message"])


def test_resume_exact_reason_from_a_manifest_is_bounded():
    """A manifest's reason longer than the CRD allows made every status patch fail with 422,
    retried with backoff for ever."""
    ck = Checkpoint(step=20, uri="s3://bucket/run/train/step-00000020", valid=True,
                    resume_exact=False, resume_exact_reason=LONG)
    plan = decide(job(), [], {"train": Listing((ck,))}, at(0))
    assert plan.create
    _reason_fits(plan)


def test_resume_exact_reason_from_a_termination_message_is_bounded():
    p = pod(pod_phase="Failed", exit_code=143, term_reason="preempted",
            disruption="EvictionByEvictionAPI")
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    term["message"] = json.dumps({**json.loads(term["message"]), "resumeExact": False,
                                  "resumeExactReason": LONG})
    plan = decide(with_status(job(), RUN1), [p], NO_CK, at(1))
    _reason_fits(plan)


# --- issue 22, item 1: one writer per prefix across re-created jobs ---------------------------
def _held_by(uid: str, attempt: int, owner_live: bool | None):
    from phoenix_trainer.core.handshake import Fence

    fence = Fence(attempt, f"old.train-{attempt}", "t", uid=uid, job="ns/old")
    return {"train": Listing(listing(10, 20).checkpoints, fence=fence, owner_live=owner_live)}


def test_a_re_created_job_adopts_the_prefix_above_the_old_fence():
    """Job "old" (attempt 5) was deleted and a job re-created on its checkpoint.uri: its
    first attempt is 6, above the old fence, and it says whose prefix it adopted."""
    plan = decide(job(), [], _held_by("u-old", 5, owner_live=False), at(0))
    assert [c.name for c in plan.create] == ["j.train-6"]
    assert env_of(plan)["PHOENIX_JOB_UID"]["value"] == "u-1"
    assert any(e.reason == C.EV_PREFIX_ADOPTED and "ns/old" in e.message for e in plan.events)


def test_a_second_job_on_a_prefix_a_live_job_holds_is_refused():
    plan = decide(job(), [], _held_by("u-other", 2, owner_live=True), at(0))
    assert plan.create == []
    cond = _cond(plan, C.COND_PREFIX_CONFLICT)
    assert cond["status"] == "True" and "ns/old" in cond["message"] and "u-other" in cond["message"]
    assert any(e.reason == C.EV_PREFIX_CONFLICT for e in plan.events)
    assert plan.requeue_after is not None


def test_a_cleared_status_continues_above_its_own_fence():
    """Clearing the status through /status reset the attempt counter: attempt 1 was fenced
    over attempt 5 of the same job, which was no longer superseded."""
    plan = decide(job(), [], _held_by("u-1", 5, owner_live=None), at(0))
    assert [c.name for c in plan.create] == ["j.train-6"]


def test_controls_name_the_job():
    from phoenix_operator.decide.standby import control
    from phoenix_operator.phoenixjob import Notice, PhaseStatus

    st = PhaseStatus("train", attempts=3, last_notice=Notice("n", "taint x", at(0), 3))
    assert control(st, "u-1").uid == "u-1"


# --- issue 22, item 9 / invariant 6: never step 0 while the status names a checkpoint -------
def test_a_checkpoint_the_status_names_but_storage_no_longer_lists_stops_the_start():
    """The endpoint or credentials changed under a running job (or the objects were
    deleted): the next listing is empty and the replacement "started fresh" from step 0
    although status.lastCheckpoint says step 40 exists. It must say so instead."""
    body = with_status(job(), phase_status(lastCheckpoint={
        "uri": "s3://bucket/run/train/step-00000040", "step": 40, "time": ts(at(0))}))
    ended = pod(pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI")
    plan = decide(body, [ended], NO_CK, at(1))
    assert plan.create == []
    cond = _cond(plan, C.COND_CHECKPOINT_MISSING)
    assert cond["status"] == "True" and "step-00000040" in cond["message"]
    assert any(e.reason == C.EV_CHECKPOINT_MISSING for e in plan.events)
    assert plan.requeue_after is not None
    # Once storage lists it again, the phase resumes from it and the condition clears.
    again = decide({**body, "status": plan.status}, [ended],
                   {"train": listing(20, 40)}, at(40))
    assert [c.name for c in again.create] == ["j.train-2"]
    assert env_of(again)["PHOENIX_RESUME_FROM"]["value"].endswith("step-00000040")
    assert _cond(again, C.COND_CHECKPOINT_MISSING)["status"] == "False"


def test_storage_that_cannot_be_listed_is_a_condition_saying_why():
    why = "StorageAccessError: checkpoint.uri s3://shared/teamY has no credentialsSecret"
    plan = decide(job(), [], {"train": Listing(error=why)}, at(0))
    assert plan.create == []
    cond = _cond(plan, C.COND_STORAGE_ERROR)
    assert cond["status"] == "True" and "no credentialsSecret" in cond["message"]
    ok = decide({**job(), "status": plan.status}, [], NO_CK, at(20))
    assert _cond(ok, C.COND_STORAGE_ERROR)["status"] == "False" and ok.create


def test_an_image_pull_error_waits_out_its_grace_before_it_counts():
    """Issue 29, item 5: a transient pull failure within the grace costs no budget."""
    p = pod(pod_phase="Pending", waiting="ErrImagePull")
    p["metadata"]["creationTimestamp"] = ts(at(0))
    plan = decide(with_status(job(), RUN1), [p], NO_CK, at(60))
    assert ps(plan)["failures"] == 0 and plan.delete == [] and plan.create == []
    assert plan.requeue_after == C.IMAGE_PULL_GRACE_SECONDS - 60
    late = decide(with_status(job(), RUN1), [p], NO_CK, at(C.IMAGE_PULL_GRACE_SECONDS + 1))
    assert ps(late)["failures"] == 1 and ps(late)["lastFailure"]["reason"] == "ImagePullFailed"
    assert [d.name for d in late.delete] == ["j.train-1"]


def test_a_secret_cache_not_synced_yet_costs_no_budget_when_it_heals():
    """A kubelet that could not sync its secret cache yet retries; with maxFailures 0 the
    first look used to fail the job. The pass waits, and looks again when the grace ends."""
    p = pod(pod_phase="Pending", waiting="CreateContainerConfigError")
    p["metadata"]["creationTimestamp"] = ts(at(0))
    plan = decide(with_status(job(), RUN1), [p], NO_CK, at(20))
    assert ps(plan)["failures"] == 0 and plan.delete == [] and plan.create == []
    assert plan.requeue_after == C.CREATE_CONTAINER_GRACE_SECONDS - 20
    healed = pod(pod_phase="Running")
    healed["metadata"]["creationTimestamp"] = ts(at(0))
    assert ps(decide(with_status(job(), RUN1), [healed], NO_CK, at(30)))["failures"] == 0
    late = decide(with_status(job(), RUN1), [p], NO_CK, at(C.CREATE_CONTAINER_GRACE_SECONDS + 1))
    assert ps(late)["failures"] == 1 and ps(late)["lastFailure"]["reason"] == "ConfigError"
