"""Preemption notices and warm standbys on real lab nodes, with the example MLP in the trainer
image, each run checked tensor for tensor against the same job undisturbed.

- A notice (the node tainted ``karpenter.sh/disrupted``, as Karpenter does before it reclaims
  a node): the trainer checkpoints at its next step, a replacement starts on another node and
  is Ready while the old pod still trains, the old trainer hands off with a final checkpoint,
  and the replacement resumes at exactly that step (0 steps lost). Nobody ever evicts the old
  pod. One writer at all times: every checkpoint's manifest names the attempt that wrote it,
  and attempt 1 wrote nothing after the step attempt 2 resumed from.
- ``recovery.standby``: a standby on another node takes over on an eviction, a SIGKILL and the
  loss of the active pod's node, and a new standby is started after each takeover.
"""
from __future__ import annotations

import signal
import threading
import time

import pytest
from kubernetes import watch

from kube_helpers import wait_for
from phoenix_e2e import GROUP, PLURAL, VERSION, phase_status, sample_job, unique
from phoenix_lab import samples
from phoenix_operator import constants as C
from phoenix_operator.podspec import pod_name
from phoenix_trainer.core.handshake import read_fence
from phoenix_trainer.core.layout import list_checkpoints

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NOTICE_TAINT = "karpenter.sh/disrupted"


def mlp_job(e2e, name: str, bucket: str, steps: int, step_delay: float, **recovery) -> dict:
    body = sample_job(e2e, name, bucket, steps=steps, step_delay=step_delay, checkpoint_every=50)
    body["spec"]["recovery"].update(backoff={"initialSeconds": 1, "maxSeconds": 5}, **recovery)
    pod_spec = body["spec"]["template"]["spec"]
    # Spot nodes only: the pods come and go with them (a lost node is never the one the
    # operator or CoreDNS run on), and there are two, so a standby always has somewhere to go.
    pod_spec["nodeSelector"] = {"phoenix.dev/spot": "true"}
    pod_spec["tolerations"] = [{"key": "phoenix.dev/spot", "operator": "Exists"}]
    return body


class PodLog(threading.Thread):
    """Watches the job's pods; records (monotonic time, pod, phase, ready, deleting)."""

    def __init__(self, kube, namespace: str, job: str) -> None:
        super().__init__(daemon=True)
        self.kube, self.namespace, self.job = kube, namespace, job
        self.seen: list[tuple[float, str, str, bool, bool]] = []
        self._watch = watch.Watch()

    def run(self) -> None:
        try:
            for ev in self._watch.stream(self.kube.core.list_namespaced_pod, self.namespace,
                                         label_selector=f"{C.LABEL_JOB}={self.job}",
                                         timeout_seconds=600):
                pod = ev["object"]
                ready = any(c.type == "Ready" and c.status == "True"
                            for c in pod.status.conditions or ())
                self.seen.append((time.monotonic(), pod.metadata.name, pod.status.phase or "",
                                  ready, pod.metadata.deletion_timestamp is not None))
        except Exception:  # noqa: BLE001 - the stream closed under us (stop, or lab teardown)
            pass

    def stop(self) -> None:
        self._watch.stop()

    def first(self, pod: str, pred) -> float | None:
        return next((t for t, name, *rest in self.seen if name == pod and pred(*rest)), None)


def _storage(e2e, bucket: str, name: str):
    return samples.open_phase_storage(f"s3://{bucket}/{name}/train",
                                      e2e.extra["s3_server"].endpoint)  # this parameter's server


def _finished(kube, ns: str, name: str, timeout: float, diagnose=None) -> dict:
    return wait_for(lambda: (j := kube.custom.get_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name)) and (j.get("status") or {}).get("phase")
        in ("Succeeded", "Failed") and j, timeout, 2, f"{name} finished", diagnose=diagnose)


def _taint(lab, node: str, on: bool) -> None:
    lab.kubectl("taint", "nodes", node, f"{NOTICE_TAINT}:NoSchedule" + ("" if on else "-"),
                check=on)


def _node_of(kube, ns: str, pod: str) -> str | None:
    return kube.core.read_namespaced_pod(pod, ns).spec.node_name


def _running(kube, ns: str, pod: str) -> bool:
    p = kube.core.read_namespaced_pod(pod, ns)
    return p.status.phase == "Running"


def test_notice_hands_off_to_a_ready_replacement_with_no_step_lost(e2e, kube, e2e_bucket,
                                                                   submit_job):
    if "lab" not in e2e.extra:
        pytest.skip("taints a node: needs the lab")
    lab, ns = e2e.extra["lab"], e2e.namespace
    ref = submit_job(mlp_job(e2e, unique("notice-ref"), e2e_bucket, 600, 0.0))
    name = submit_job(mlp_job(e2e, unique("notice"), e2e_bucket, 600, 0.05))
    log = PodLog(kube, ns, name)
    log.start()
    first, second = pod_name(name, "train", 1), pod_name(name, "train", 2)
    job = lambda: kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)  # noqa: E731
    diagnose = lambda: f"status: {job().get('status')}\noperator:\n{e2e.operator_logs()}"  # noqa: E731
    storage = _storage(e2e, e2e_bucket, name)
    wait_for(lambda: list_checkpoints(storage), 240, 0.5, "a first checkpoint", diagnose=diagnose)
    node = _node_of(kube, ns, first)
    _taint(lab, node, True)
    try:
        wait_for(lambda: phase_status(job()).get("lastNotice", {}).get("handoffTo") == 2, 120, 0.5,
                 "the handoff to a ready standby", diagnose=diagnose)
        done = _finished(kube, ns, name, 300, diagnose)
    finally:
        _taint(lab, node, False)
        log.stop()
    assert done["status"]["phase"] == "Succeeded", diagnose()
    st = phase_status(done)
    assert (st["attempts"], st["preemptions"], st["failures"], st["promotions"], st["notices"]) \
        == (2, 1, 0, 1, 1), st
    assert st["lastNotice"]["node"] == node and NOTICE_TAINT in st["lastNotice"]["signal"]
    assert _node_of(kube, ns, second) != node
    # The replacement was Ready while the old pod still ran; nobody deleted the old pod.
    ready = log.first(second, lambda phase, ready, deleting: ready)
    old_end = log.first(first, lambda phase, ready, deleting: phase in ("Succeeded", "Failed"))
    assert ready is not None and old_end is not None and ready < old_end, log.seen
    assert log.first(first, lambda phase, ready, deleting: deleting) is None or \
        log.first(first, lambda phase, ready, deleting: deleting) > old_end
    # Checkpoint now: attempt 1 saved off its 50-step interval for the notice, then its final.
    ends, starts = samples.attempt_ends(storage), samples.attempt_starts(storage)
    from phoenix_trainer.attempt_log import read_metrics

    saved = [r["step"] for r in read_metrics(storage)
             if r.get("event") == "checkpoint" and r["attempt"] == 1]
    # The notice's checkpoint-now and the final one at the handoff come at the next step
    # boundary, off the interval unless one happens to fall on a multiple of 50 (a CI run
    # saw the final land on one): at least one is off it.
    assert len(saved) >= 2 and any(s % 50 for s in saved), saved
    # 0 steps lost: attempt 2 resumed at the very step attempt 1 reached.
    assert starts[2][0] == ends[1] == saved[-1], (starts, ends, saved)
    # One writer: attempt 1 published nothing beyond that step, attempt 2 nothing before it.
    for c in list_checkpoints(storage):
        a = c.manifest.attempt
        assert (a == 1 and c.step <= starts[2][0]) or (a == 2 and c.step >= starts[2][0]), c
    assert read_fence(storage).attempt == 2
    ref_done = _finished(kube, ns, ref, 300)
    assert ref_done["status"]["phase"] == "Succeeded"
    same, uri = samples.final_weights_equal(storage, _storage(e2e, e2e_bucket, ref))
    assert same, (f"{uri} differs from the undisturbed run: "
                  f"{samples.divergence(storage, _storage(e2e, e2e_bucket, ref))}")


# full: the standby's take-overs (make test has the notice's hand-off to a ready standby)
@pytest.mark.full
def test_standby_takes_over_on_eviction_sigkill_and_node_loss(e2e, kube, e2e_bucket, submit_job):
    if "lab" not in e2e.extra:
        pytest.skip("kills a container and loses a node: needs the lab")
    lab, ns = e2e.extra["lab"], e2e.namespace
    ref = submit_job(mlp_job(e2e, unique("standby-ref"), e2e_bucket, 1200, 0.0))
    name = submit_job(mlp_job(e2e, unique("standby"), e2e_bucket, 1200, 0.05, standby=True))
    job = lambda: kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)  # noqa: E731
    diagnose = lambda: f"status: {job().get('status')}\noperator:\n{e2e.operator_logs()}"  # noqa: E731
    storage = _storage(e2e, e2e_bucket, name)

    def ready_standby(active: int) -> dict:
        def check():
            st = phase_status(job())
            sb = st.get("standby") or {}
            return st.get("attempts") == active and sb.get("ready") and \
                _running(kube, ns, st["pod"]) and sb
        return wait_for(check, 240, 0.5, f"attempt {active} running with a ready standby",
                        diagnose=diagnose)

    wait_for(lambda: list_checkpoints(storage), 240, 0.5, "a first checkpoint", diagnose=diagnose)
    disruptions = [
        ("eviction", lambda pod: e2e.evict(ns, pod)),
        ("sigkill", lambda pod: lab.kill_pod(ns, pod, signal.SIGKILL)),
        ("node loss", lambda pod: lab.lose_node(_node_of(kube, ns, pod), wait=False)),
    ]
    active = 1
    for what, disrupt in disruptions:
        sb = ready_standby(active)
        pod = phase_status(job())["pod"]
        assert sb["node"] != _node_of(kube, ns, pod), sb
        disrupt(pod)
        wait_for(lambda: phase_status(job()).get("attempts") == sb["attempt"], 120, 0.25,
                 f"the standby taking over after the {what}", diagnose=diagnose)
        st = phase_status(job())
        assert st["pod"] == sb["pod"], (what, st)
        active = sb["attempt"]
    ready_standby(active)  # replaced after the last takeover too
    done = _finished(kube, ns, name, 400, diagnose)
    assert done["status"]["phase"] == "Succeeded", diagnose()
    st = phase_status(done)
    # Eviction and node loss are preemptions; a bare SIGKILL on a healthy node a failure.
    assert (st["promotions"], st["preemptions"], st["failures"]) == (3, 2, 1), st
    assert "standby" not in st  # removed when the phase succeeded
    ref_done = _finished(kube, ns, ref, 300)
    assert ref_done["status"]["phase"] == "Succeeded"
    same, uri = samples.final_weights_equal(storage, _storage(e2e, e2e_bucket, ref))
    assert same, (f"{uri} differs from the undisturbed run: "
                  f"{samples.divergence(storage, _storage(e2e, e2e_bucket, ref))}")
