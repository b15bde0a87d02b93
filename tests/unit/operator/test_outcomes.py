"""Every way a trainer pod can end, and what it counts as."""
import pytest

from phoenix_operator.node_health import NodeHealth, node_grace_left, node_health, stranded
from phoenix_operator.outcomes import DELETED_KEY, bare_kill, classify, gone, waiting_grace_left
from phoenix_operator import constants as C
from phoenix_operator.constants import Cause

from opfacts import at, pod

pytestmark = pytest.mark.unit

CASES = [
    # id, pod, expected cause, expected reason
    ("running", pod(), None, ""),
    ("pending", pod(pod_phase="Pending"), None, ""),
    ("terminating-still-running", pod(deletion=at(0)), None, ""),
    ("succeeded", pod(pod_phase="Succeeded", exit_code=0), Cause.COMPLETED, "Completed"),
    ("exit0-in-failed-pod", pod(pod_phase="Failed", exit_code=0), Cause.COMPLETED, "Completed"),
    ("disruption-target-eviction",
     pod(pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI"),
     Cause.PREEMPTION, "EvictionByEvictionAPI"),
    ("disruption-target-beats-oom",
     pod(pod_phase="Failed", exit_code=137, reason="OOMKilled", disruption="DeletionByPodGC"),
     Cause.PREEMPTION, "DeletionByPodGC"),
    ("evicted-status-reason", pod(pod_phase="Failed", status_reason="Evicted"),
     Cause.PREEMPTION, "Evicted"),
    ("node-lost", pod(pod_phase="Failed", status_reason="NodeLost"), Cause.PREEMPTION, "NodeLost"),
    ("node-shutdown", pod(pod_phase="Failed", exit_code=143, status_reason="Terminated"),
     Cause.PREEMPTION, "NodeLost"),
    ("unknown-phase", pod(pod_phase="Unknown"), Cause.PREEMPTION, "NodeLost"),
    ("oom", pod(pod_phase="Failed", exit_code=137, reason="OOMKilled"), Cause.FAILURE, "OOMKilled"),
    # The trainer's own word is not enough (issue 22): a probe's SIGTERM says the same.
    ("trainer-says-preempted", pod(pod_phase="Failed", exit_code=1, term_reason="preempted"),
     Cause.FAILURE, "SIGTERM"),
    ("deleted-by-others-exit1", pod(pod_phase="Failed", exit_code=1, deletion=at(0)),
     Cause.PREEMPTION, "DeletedExternally"),
    # 137/143 alone is not a preemption (liveness probe, activeDeadlineSeconds, self-kill).
    ("bare-sigterm", pod(pod_phase="Failed", exit_code=143), Cause.FAILURE, "SIGTERM"),
    ("bare-sigkill", pod(pod_phase="Failed", exit_code=137), Cause.FAILURE, "SIGKILL"),
    ("sigterm-trainer-says-preempted", pod(pod_phase="Failed", exit_code=143,
                                           term_reason="preempted"),
     Cause.FAILURE, "SIGTERM"),
    ("evicted-trainer-says-preempted", pod(pod_phase="Failed", exit_code=143,
                                           term_reason="preempted",
                                           disruption="EvictionByEvictionAPI"),
     Cause.PREEMPTION, "EvictionByEvictionAPI"),
    ("sigkill-deleted-by-others", pod(pod_phase="Failed", exit_code=137, deletion=at(0)),
     Cause.PREEMPTION, "DeletedExternally"),
    ("sigkill-evicted", pod(pod_phase="Failed", exit_code=137, disruption="TerminationByKubelet"),
     Cause.PREEMPTION, "TerminationByKubelet"),
    ("active-deadline", pod(pod_phase="Failed", exit_code=137, status_reason="DeadlineExceeded"),
     Cause.FAILURE, "DeadlineExceeded"),
    ("active-deadline-no-exit", pod(pod_phase="Failed", status_reason="DeadlineExceeded"),
     Cause.FAILURE, "DeadlineExceeded"),
    ("exit1", pod(pod_phase="Failed", exit_code=1), Cause.FAILURE, "Error"),
    ("exit1-with-message", pod(pod_phase="Failed", exit_code=1, term_reason="failed",
                               message="loss is NaN"), Cause.FAILURE, "Error"),
    ("exit0-but-trainer-failed", pod(pod_phase="Failed", exit_code=0, term_reason="failed"),
     Cause.FAILURE, "Error"),
    # (no clock, no times: past any grace - test_an_image_pull_error_counts_only_after_the_grace)
    ("image-pull", pod(pod_phase="Pending", waiting="ImagePullBackOff"), Cause.FAILURE,
     "ImagePullFailed"),
    ("bad-config", pod(pod_phase="Pending", waiting="CreateContainerConfigError"), Cause.FAILURE,
     "ConfigError"),
    ("crashloop", pod(pod_phase="Running", waiting="CrashLoopBackOff"), Cause.FAILURE,
     "ConfigError"),
    ("benign-waiting", pod(pod_phase="Pending", waiting="ContainerCreating"), None, ""),
    ("admission-refused", pod(pod_phase="Failed", status_reason="OutOfnvidia.com/gpu"),
     Cause.PREEMPTION, "OutOfnvidia.com/gpu"),
    ("failed-no-info", pod(pod_phase="Failed"), Cause.FAILURE, "UnknownExit"),
]


@pytest.mark.parametrize("p, cause, reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classify(p, cause, reason):
    outcome = classify(p)
    assert outcome.cause == cause
    assert outcome.reason == reason


def test_fatal_waiting_asks_for_delete():
    assert classify(pod(pod_phase="Pending", waiting="ErrImagePull")).delete
    assert not classify(pod(pod_phase="Failed", exit_code=1)).delete


def test_termination_message_is_parsed():
    outcome = classify(pod(pod_phase="Failed", exit_code=143, term_reason="preempted",
                           message="SIGTERM at step 40", disruption="EvictionByEvictionAPI"))
    assert outcome.termination.step == 40
    assert outcome.termination.emergencySaveCompleted
    assert outcome.message == "evicted"  # the DisruptionTarget condition's message
    assert outcome.finished_at == at(0)


def test_garbage_termination_message_kept_as_text():
    p = pod(pod_phase="Failed", exit_code=1)
    p["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "Traceback: boom"
    outcome = classify(p)
    assert outcome.termination is None
    assert outcome.message == "Traceback: boom"


def test_trainer_container_by_annotation():
    p = pod(pod_phase="Failed", exit_code=1)
    p["spec"]["containers"] = [{"name": "sidecar"}, {"name": "trainer"}]
    p["status"]["containerStatuses"].insert(0, {"name": "sidecar", "state": {
        "terminated": {"exitCode": 0}}})
    p["metadata"]["annotations"]["phoenix.dev/trainer-container"] = "trainer"
    assert classify(p).cause == Cause.FAILURE


def test_gone_is_preemption():
    assert gone("x").cause == Cause.PREEMPTION


def _deleted(p):
    return {**p, DELETED_KEY: True}


TOMBSTONES = [
    ("evicted-while-running", _deleted(pod(deletion=at(0), disruption="EvictionByEvictionAPI")),
     "EvictionByEvictionAPI"),
    ("force-deleted-while-running", _deleted(pod(deletion=at(0))), "PodDeleted"),
    ("evicted-and-exited", _deleted(pod(pod_phase="Failed", exit_code=143,
                                        disruption="EvictionByEvictionAPI")),
     "EvictionByEvictionAPI"),
    ("deleted-after-sigterm", _deleted(pod(pod_phase="Failed", exit_code=143, deletion=at(0))),
     "DeletedExternally"),
]


@pytest.mark.parametrize("p, reason", [t[1:] for t in TOMBSTONES], ids=[t[0] for t in TOMBSTONES])
def test_deleted_pod_is_judged_by_its_last_state(p, reason):
    outcome = classify(p)
    assert outcome.cause == Cause.PREEMPTION and outcome.reason == reason


def test_deleted_pod_that_completed_still_counts_as_completed():
    assert classify(_deleted(pod(pod_phase="Succeeded", exit_code=0))).cause == Cause.COMPLETED


# --- node loss: the pod still looks live, its node says otherwise ------------------------
MISSING = {"n1": NodeHealth(missing=True)}


OUT = {"n1": NodeHealth(not_ready_since=at(0), out_of_service=True)}
NOT_READY = {"n1": NodeHealth(not_ready_since=at(0))}


@pytest.mark.parametrize("p,nodes,now,cause", [
    (pod(node="n1"), MISSING, at(5), Cause.PREEMPTION),
    (pod(node="n1", pod_phase="Pending"), MISSING, at(5), Cause.PREEMPTION),
    (pod(node="n1", deletion=at(0)), MISSING, at(5), Cause.PREEMPTION),  # stuck terminating
    (pod(node="n1"), OUT, at(5), Cause.PREEMPTION),   # the out-of-service taint: node is down
    # NotReady alone, however long: a partitioned kubelet may still run the trainer.
    (pod(node="n1"), NOT_READY, at(41), None),
    (pod(node="n1"), NOT_READY, at(3600), None),
    (pod(node="n1"), {"n1": NodeHealth()}, at(5), None),
    (pod(node="n2"), MISSING, at(5), None),           # another node
    (pod(), MISSING, at(5), None),                     # not bound yet
    (pod(node="n1"), MISSING, None, None),             # no clock: no judgement
])
def test_live_pod_on_lost_node(p, nodes, now, cause):
    out = classify(p, nodes, now)
    assert out.cause == cause
    if cause:
        assert out.reason == "NodeLost" and out.delete and out.force
        assert "n1" in out.message


def test_pod_that_ended_keeps_its_own_reason_on_a_lost_node():
    out = classify(pod(node="n1", pod_phase="Failed", exit_code=1), MISSING, at(5))
    assert out.cause == Cause.FAILURE and not out.force


def test_pod_on_a_not_ready_node_is_stranded_after_the_grace_never_lost():
    p = pod(node="n1")
    assert node_grace_left(p, NOT_READY, at(10), 40.0) == 30.0
    assert stranded(p, NOT_READY, at(40), 40.0) is None
    why = stranded(p, NOT_READY, at(41), 40.0)
    assert "NotReady since 2026-01-01T12:00:00Z" in why and "out-of-service" in why
    assert stranded(p, OUT, at(41), 40.0) is None and stranded(p, MISSING, at(41), 40.0) is None


@pytest.mark.parametrize("node,health", [
    (None, NodeHealth(missing=True)),
    ({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, NodeHealth()),
    ({"status": {"conditions": [{"type": "Ready", "status": "Unknown",
                                 "lastTransitionTime": "2026-01-01T12:00:00Z"}]}},
     NodeHealth(not_ready_since=at(0))),
    ({"status": {"conditions": [{"type": "Ready", "status": "False",
                                 "lastTransitionTime": "2026-01-01T12:00:00Z"}]}},
     NodeHealth(not_ready_since=at(0))),
    ({"status": {}}, NodeHealth()),  # no Ready condition yet: cannot tell
    ({"spec": {"taints": [{"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown",
                           "effect": "NoExecute"}]},
      "status": {"conditions": [{"type": "Ready", "status": "Unknown",
                                 "lastTransitionTime": "2026-01-01T12:00:00Z"}]}},
     NodeHealth(not_ready_since=at(0), out_of_service=True)),
])
def test_node_health(node, health):
    assert node_health(node) == health


# --- 137/143 corroborated by the node ------------------------------------------------------
@pytest.mark.parametrize("health,cause,reason", [
    (NodeHealth(missing=True), Cause.PREEMPTION, "NodeLost"),
    (NodeHealth(not_ready_since=at(0)), Cause.PREEMPTION, "NodeLost"),
    (NodeHealth(), Cause.FAILURE, "SIGKILL"),
])
def test_bare_kill_is_judged_by_its_node(health, cause, reason):
    out = classify(pod(node="n1", pod_phase="Failed", exit_code=137), {"n1": health}, at(1))
    assert (out.cause, out.reason) == (cause, reason)
    if cause == Cause.FAILURE:
        assert "no sign of a disruption" in out.message


def test_bare_kill_asks_for_its_node_and_nothing_else_does():
    assert bare_kill(pod(node="n1", pod_phase="Failed", exit_code=137))
    assert bare_kill(pod(node="n1", pod_phase="Failed", exit_code=143))
    assert bare_kill(pod(node="n1", pod_phase="Failed", exit_code=143, term_reason="preempted"))
    assert not bare_kill(pod(node="n1", pod_phase="Failed", exit_code=1))
    assert not bare_kill(pod(node="n1", pod_phase="Failed", exit_code=137, reason="OOMKilled"))
    assert not bare_kill(pod(node="n1"))


@pytest.mark.parametrize("message,cause", [
    ("Pod ephemeral local storage usage exceeds the total limit of containers 1Gi.",
     Cause.FAILURE),
    ('Container trainer exceeded its local ephemeral storage limit "1Gi". ', Cause.FAILURE),
    ("The node was low on resource: ephemeral-storage. ", Cause.PREEMPTION),
])
def test_eviction_for_its_own_limits_is_a_failure(message, cause):
    """An over-full checkpoint spool gets the pod evicted, DisruptionTarget and all; retried
    as a preemption it would be evicted again, forever."""
    p = pod(pod_phase="Failed", exit_code=137, status_reason="Evicted",
            disruption="TerminationByKubelet")
    p["status"]["message"] = message
    out = classify(p)
    assert out.cause == cause
    if cause == Cause.FAILURE:
        assert out.reason == "LimitExceeded" and "limit" in out.message


# --- issue 22, item 3: what the trainer says alone is not a preemption ---------------------
def test_trainer_says_preempted_without_corroboration_is_a_failure():
    """A liveness probe kills the trainer: SIGTERM -> emergency save -> "preempted" -> exit
    143. Counted as a preemption, it was replaced at once, forever."""
    p = pod(node="n1", pod_phase="Failed", exit_code=143, term_reason="preempted")
    out = classify(p, {"n1": NodeHealth()}, at(1))
    assert (out.cause, out.reason) == (Cause.FAILURE, "SIGTERM")
    assert "preempted" in out.message and "liveness probe" in out.message
    assert bare_kill(p), "its node's health decides: the caller must gather it"


@pytest.mark.parametrize("health,reason", [
    (NodeHealth(missing=True), "NodeLost"),
    (NodeHealth(not_ready_since=at(0)), "NodeLost"),
    (NodeHealth(notice="taint karpenter.sh/disrupted"), "ReclaimNotice"),
])
def test_trainer_says_preempted_corroborated_by_its_node(health, reason):
    p = pod(node="n1", pod_phase="Failed", exit_code=143, term_reason="preempted")
    out = classify(p, {"n1": health}, at(1))
    assert (out.cause, out.reason) == (Cause.PREEMPTION, reason)


@pytest.mark.parametrize("status_reason,cause", [
    ("OutOfnvidia.com/gpu", Cause.PREEMPTION),   # a capacity race: another node will do
    ("OutOfcpu", Cause.PREEMPTION),
    ("NodeAffinity", Cause.PREEMPTION),           # the node's labels changed under it
    ("SysctlForbidden", Cause.FAILURE),           # the template asks what no node allows
    ("AppArmor", Cause.FAILURE),
    ("UnexpectedAdmissionError", Cause.FAILURE),
])
def test_kubelet_refusal_that_repeats_everywhere_is_a_failure(status_reason, cause):
    """Five passes made five pods of a template the kubelet refuses deterministically."""
    out = classify(pod(pod_phase="Failed", status_reason=status_reason))
    assert (out.cause, out.reason) == (cause, status_reason)
    assert out.started is False
    if cause == Cause.FAILURE:
        assert "pod template" in out.message


@pytest.mark.parametrize("using,request_,cause", [
    ("3Gi", "1Gi", Cause.FAILURE),       # the trainer used 3x what it asked for
    ("500Mi", "1Gi", Cause.PREEMPTION),  # within its request: the node's pressure, not ours
    ("1000Mi", "0", Cause.FAILURE),      # no request at all: any use is above it
])
def test_node_pressure_eviction_for_own_usage_above_requests(using, request_, cause):
    p = pod(pod_phase="Failed", exit_code=137, status_reason="Evicted",
            disruption="TerminationByKubelet")
    p["status"]["message"] = (
        "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi. "
        f"Container trainer was using {using}, request is {request_}, has larger consumption "
        "of memory. ")
    out = classify(p)
    assert out.cause == cause
    if cause == Cause.FAILURE:
        assert out.reason == "OverRequest" and "request" in out.message


def test_started_tells_whether_the_trainer_ever_ran():
    assert classify(pod(pod_phase="Failed", exit_code=143, disruption="X")).started
    assert not classify(pod(pod_phase="Failed", status_reason="OutOfcpu")).started


def test_a_pod_deleted_before_its_trainer_ran_did_not_start():
    p = pod(pod_phase="Pending", waiting="ContainerCreating")
    p[DELETED_KEY] = True
    assert not classify(p).started
    q = pod(pod_phase="Running")
    q[DELETED_KEY] = True
    assert classify(q).started


# --- issue 29, item 5: a pull that heals within the grace costs nothing --------------------
def _pulling(reason: str):
    from phoenix_operator.phoenixjob import ts

    p = pod(pod_phase="Pending", waiting=reason, node="spot-1")
    p["metadata"]["creationTimestamp"] = ts(at(0))
    p["status"]["conditions"].append({"type": "PodScheduled", "status": "True",
                                      "lastTransitionTime": ts(at(5))})
    return p


@pytest.mark.parametrize("reason, grace, counted_as, hint", [
    ("ErrImagePull", C.IMAGE_PULL_GRACE_SECONDS, "ImagePullFailed", "check the image name"),
    ("ImagePullBackOff", C.IMAGE_PULL_GRACE_SECONDS, "ImagePullFailed", "check the image name"),
    ("CreateContainerConfigError", C.CREATE_CONTAINER_GRACE_SECONDS, "ConfigError",
     "check the Secrets and ConfigMaps"),
    ("CreateContainerError", C.CREATE_CONTAINER_GRACE_SECONDS, "ConfigError",
     "check the Secrets and ConfigMaps"),
])
def test_a_waiting_reason_that_may_heal_counts_only_after_its_grace(reason, grace, counted_as, hint):
    """A cold spot node pulling a 5.7 GiB image through a flaky registry: the first
    ErrImagePull was a failure, and three of them (maxFailures 3) failed the phase. A demo's
    reference run (maxFailures 0) failed on a node whose kubelet had just started:
    "CreateContainerConfigError: failed to sync secret cache: timed out waiting for the
    condition", which the kubelet retries and heals. Each counts only once it lasts."""
    p = _pulling(reason)
    assert classify(p, {}, at(5 + grace - 1)).live
    assert waiting_grace_left(p, at(35)) == grace - 30
    out = classify(p, {}, at(5 + grace + 1))
    assert (out.cause, out.reason) == (Cause.FAILURE, counted_as)
    assert out.delete and not out.started and reason in out.message and hint in out.message


def test_an_image_name_that_cannot_be_valid_fails_at_once():
    out = classify(_pulling("InvalidImageName"), {}, at(6))
    assert (out.cause, out.reason) == (Cause.FAILURE, "ConfigError")
