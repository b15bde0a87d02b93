"""The operator on the lab, running as the chart's ServiceAccount: recovery end to end."""
from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from phoenix_operator.podspec import pod_name
from phoenix_trainer.core.layout import step_dir_name
from phoenix_trainer.core.storage import Credentials, open_storage

from kube_helpers import python_pod, wait_for
from operator_process import OperatorProcess
from pxj_helpers import (create, env_of, events, get, live, patch_spec, phase_status,
                         phoenixjob, pod_or_none, trainer_pods, wait)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LONG = {"FAKE_STEPS": 100000, "FAKE_STEP_SECONDS": 0.05, "FAKE_CKPT_EVERY": 5}


def storage_for(s3, bucket, phase="train"):
    return open_storage(f"s3://{bucket}/run/{phase}", Credentials(
        endpoint_url=s3.url, access_key=s3.access_key, secret_key=s3.secret_key))


def running(core, ns, name):
    pod = pod_or_none(core, ns, name)
    return pod if pod is not None and pod.status.phase == "Running" else None


def has_checkpoints(s3, bucket, n, phase="train"):
    storage = storage_for(s3, bucket, phase)
    from phoenix_trainer.core.layout import checkpoint_steps
    return len(checkpoint_steps(storage)) >= n


def test_job_runs_to_succeeded(lab, lab_s3, operator, core, custom, ns, bucket, recorder):
    body = phoenixjob("ok", bucket, lab_s3.url, image=lab.trainer_image,
                      phases=("pretrain", "finetune"),
                      env={"FAKE_STEPS": 10, "FAKE_CKPT_EVERY": 5,
                           "FAKE_RECORD": recorder.address})
    # The container declares an ephemeral-storage limit: the trainer learns it (downward API)
    # as its spool's default limit.
    resources = body["spec"]["template"]["spec"]["containers"][0]["resources"]
    resources["limits"]["ephemeral-storage"] = "1Gi"
    # The lab's kubelets report no ephemeral-storage capacity to schedule against: request
    # none (the limit alone is what the trainer learns).
    resources.setdefault("requests", {})["ephemeral-storage"] = "0"
    create(custom, ns, body)
    job = wait_for(lambda: (j := get(custom, ns, "ok")).get("status", {}).get("phase")
                   == "Succeeded" and j, 90, 0.2, "job Succeeded", diagnose=lambda: lab.kubectl(
                       "-n", ns, "describe", "pods", check=False).stdout[-3000:])
    assert [p["state"] for p in job["status"]["phases"]] == ["Succeeded", "Succeeded"]
    assert [p["attempts"] for p in job["status"]["phases"]] == [1, 1]
    cond = {c["type"]: c for c in job["status"]["conditions"]}
    assert cond["Succeeded"]["status"] == "True"
    assert job["status"]["observedGeneration"] == job["metadata"]["generation"]
    starts = [json.loads(m) for m in recorder.messages]
    assert [s["ephemeral_mb"] for s in starts] == ["1074", "1074"]  # 1Gi in MB, rounded up
    finetune = next(s for s in starts if s["init_from"])
    assert finetune["init_from"].endswith("/pretrain/" + step_dir_name(10))
    pod = core.read_namespaced_pod(pod_name("ok", "pretrain", 1), ns)
    assert pod.metadata.owner_references[0].kind == "PhoenixJob"
    wait(lambda: {"PodCreated", "JobSucceeded"} <= {e.reason for e in events(core, ns, "ok")},
         10, "events PodCreated and JobSucceeded")


# The one cluster test `make test` runs against SeaweedFS too (about 3 s; tests/s3_selection.py).
@pytest.mark.all_s3_servers
def test_eviction_gets_next_attempt_resuming_from_newest_valid(
        lab, lab_s3, operator, core, custom, ns, bucket):
    create(custom, ns, phoenixjob("ev", bucket, lab_s3.url, image=lab.trainer_image, env=LONG))
    wait(lambda: running(core, ns, pod_name("ev", "train", 1)), 60, "attempt 1 running")
    wait(lambda: has_checkpoints(lab_s3, bucket, 2), 60, "two checkpoints")
    lab.evict(ns, pod_name("ev", "train", 1))
    pod2 = wait(lambda: pod_or_none(core, ns, pod_name("ev", "train", 2)), 60, "replacement pod of attempt 2")
    env = env_of(pod2)
    assert env["PHOENIX_ATTEMPT"] == "2"
    # Attempt 1 saved an emergency checkpoint on SIGTERM; it is the newest valid one and the
    # operator verified and chose it.
    from phoenix_trainer.core.layout import list_checkpoints
    by_attempt1 = [c for c in list_checkpoints(storage_for(lab_s3, bucket), deep=True)
                   if c.valid and c.manifest.attempt == 1]
    assert env["PHOENIX_RESUME_FROM"] == max(by_attempt1, key=lambda c: c.step).uri
    job = wait(lambda: (j := get(custom, ns, "ev")) and phase_status(j).get("attempts") == 2
               and phase_status(j).get("state") == "Running" and j, 30, "status attempt 2")
    ps = phase_status(job)
    assert ps["preemptions"] == 1 and ps["failures"] == 0
    assert ps["lastFailure"]["cause"] == "preemption"
    assert ps["lastFailure"]["reason"] == "EvictionByEvictionAPI"
    assert len(live(trainer_pods(core, ns, "ev"))) == 1
    wait(lambda: "Preempted" in [e.reason for e in events(core, ns, "ev")], 10, "Preempted event")
    # This job's series only: the session's operator counts every earlier test's jobs too
    # (this test on the other S3 server among them).
    def recoveries(text):
        return [x for x in text.splitlines()
                if x.startswith("phoenix_recoveries_total{") and f'namespace="{ns}"' in x]
    text = wait(lambda: recoveries(m := operator.metrics()) and m, 10, "metrics")
    assert 'cause="preemption"' in text and "phoenix_time_to_replacement_seconds_count" in text
    [line] = recoveries(text)
    # the PhoenixJob is phoenixjob=, not job= (Prometheus keeps that for the scrape job)
    assert 'cause="preemption"' in line and 'phoenixjob="ev"' in line and ',job=' not in line


def test_corrupt_newest_checkpoint_is_skipped(lab, lab_s3, operator, core, custom, ns, bucket):
    env = dict(LONG, FAKE_CKPT_UNTIL=15)
    create(custom, ns, phoenixjob("cor", bucket, lab_s3.url, image=lab.trainer_image, env=env))
    wait(lambda: running(core, ns, pod_name("cor", "train", 1)), 60, "attempt 1 running")
    s3 = lab_s3.client()
    key = f"run/train/{step_dir_name(15)}/state.bin"
    wait(lambda: s3.list_objects_v2(Bucket=bucket, Prefix=f"run/train/{step_dir_name(15)}/"
                                    "manifest.json").get("KeyCount"), 60, "checkpoint 15")
    data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(b ^ 0xFF for b in data))  # same size
    lab.kill_pod(ns, pod_name("cor", "train", 1), signal.SIGKILL)  # no emergency save; bare 137 = failure
    pod2 = wait(lambda: pod_or_none(core, ns, pod_name("cor", "train", 2)), 60, "replacement")
    assert env_of(pod2)["PHOENIX_RESUME_FROM"].endswith(step_dir_name(10))
    skipped = wait(lambda: [e for e in events(core, ns, "cor") if e.reason == "CheckpointSkipped"],
                   10, "CheckpointSkipped event")
    assert "sha256" in skipped[0].message
    assert phase_status(get(custom, ns, "cor"))["lastFailure"]["reason"] == "SIGKILL"


def test_failures_back_off_and_exhaust_but_preemptions_do_not_count(
        lab, lab_s3, operator, core, custom, ns, bucket):
    env = dict(LONG, FAKE_FAIL_ATTEMPTS="2,3,4", FAKE_FAIL_AFTER=2)
    create(custom, ns, phoenixjob("fl", bucket, lab_s3.url, image=lab.trainer_image, env=env, recovery={
        "maxFailures": 2, "backoff": {"initialSeconds": 2, "maxSeconds": 4}}))
    wait(lambda: running(core, ns, pod_name("fl", "train", 1)), 60, "attempt 1 running")
    lab.evict(ns, pod_name("fl", "train", 1))  # a preemption first: must not touch the failure budget
    job = wait(lambda: (j := get(custom, ns, "fl")).get("status", {}).get("phase") == "Failed" and j,
               120, "job Failed")
    ps = phase_status(job)
    assert ps["preemptions"] == 1 and ps["failures"] == 3 and ps["attempts"] == 4
    assert ps["lastFailure"]["exitCode"] == 1
    cond = {c["type"]: c for c in job["status"]["conditions"]}["Failed"]
    assert cond["status"] == "True" and cond["reason"] == "BudgetExhausted"
    assert "maxFailures=2" in cond["message"] and "exit code 1" in cond["message"]
    assert "injected failure" in cond["message"]
    # exponential backoff between failed attempts: 2s then 4s
    pods = {p.metadata.name: p for p in trainer_pods(core, ns, "fl")}

    def gap(prev, nxt):
        end = pods[prev].status.container_statuses[0].state.terminated.finished_at
        return (pods[nxt].metadata.creation_timestamp - end).total_seconds()

    assert gap(pod_name("fl", "train", 2), pod_name("fl", "train", 3)) >= 1  # backoff 2s (1s slack: second precision)
    assert gap(pod_name("fl", "train", 3), pod_name("fl", "train", 4)) >= 3  # backoff 4s
    assert not live(trainer_pods(core, ns, "fl"))
    wait(lambda: "BudgetExhausted" in [e.reason for e in events(core, ns, "fl")], 10,
         "BudgetExhausted event")


class LivePodWatch(threading.Thread):
    """Polls a job's pods and remembers the most trainer pods ever alive at once."""

    def __init__(self, core, ns, job):
        super().__init__(daemon=True)
        self.core, self.ns, self.job = core, ns, job
        self.max_live = 0
        self.worst: list = []
        self.done = threading.Event()

    def run(self):
        deadline = time.monotonic() + 300
        while not self.done.is_set() and time.monotonic() < deadline:
            try:
                now = live(trainer_pods(self.core, self.ns, self.job))
                if len(now) > self.max_live:
                    self.max_live = len(now)
                    self.worst = [(p.metadata.name, p.status.phase,
                                   p.metadata.deletion_timestamp) for p in now]
            except Exception:  # noqa: BLE001 - keep watching through API hiccups
                pass
            time.sleep(0.05)


def test_operator_killed_mid_recovery_creates_no_duplicate(lab, lab_s3, operator, core, custom, ns,
                                                           bucket):
    create(custom, ns, phoenixjob("rs", bucket, lab_s3.url, image=lab.trainer_image, env=LONG))
    wait(lambda: running(core, ns, pod_name("rs", "train", 1)), 60, "attempt 1 running")
    watch = LivePodWatch(core, ns, "rs")
    watch.start()
    try:
        operator.kill()
        lab.evict(ns, pod_name("rs", "train", 1))
        wait(lambda: (p := pod_or_none(core, ns, pod_name("rs", "train", 1))) is None
             or p.status.phase == "Failed", 30, "attempt 1 ended")
        # The restarted operator rebuilds its state from status + pods (by label) and
        # replaces attempt 1 exactly once.
        operator.start()
        wait(lambda: running(core, ns, pod_name("rs", "train", 2)), 60, "attempt 2 running")
        # kill again right away, twice, while it settles; then let it run
        for _ in range(2):
            operator.kill()
            operator.start()
        job = wait(lambda: (j := get(custom, ns, "rs")) and phase_status(j).get("attempts") == 2
                   and phase_status(j)["state"] == "Running" and j, 30, "status attempt 2")
        time.sleep(3)
    finally:
        watch.done.set()
        watch.join(5)
    names = sorted(p.metadata.name for p in trainer_pods(core, ns, "rs"))
    assert names == [pod_name("rs", "train", 2)]  # attempt 1 was evicted (deleted); no attempt 3
    assert watch.max_live == 1, watch.worst
    assert phase_status(job)["preemptions"] == 1


def test_two_operators_at_once_never_two_live_pods(
        lab, lab_s3, operator, operator_rbac, core, custom, ns, bucket, tmp_path):
    second = OperatorProcess(operator_rbac, tmp_path, lab_s3.url)
    second.start()
    watch = LivePodWatch(core, ns, "dd")
    try:
        create(custom, ns, phoenixjob("dd", bucket, lab_s3.url, image=lab.trainer_image, env=LONG))
        watch.start()
        for attempt in (1, 2, 3):
            wait(lambda: running(core, ns, pod_name("dd", "train", attempt)), 60, f"attempt {attempt}")
            lab.evict(ns, pod_name("dd", "train", attempt))
        wait(lambda: running(core, ns, pod_name("dd", "train", 4)), 60, "attempt 4")
        job = wait(lambda: (j := get(custom, ns, "dd")) and phase_status(j).get("attempts") == 4
                   and j, 30, "status attempt 4")
        time.sleep(2)
    finally:
        watch.done.set()
        second.stop()
    assert watch.max_live == 1, watch.worst
    assert [p.metadata.name for p in trainer_pods(core, ns, "dd")] == [pod_name("dd", "train", 4)]
    assert phase_status(job)["preemptions"] == 3


def test_suspend_deletes_pod_and_resume_continues(lab, lab_s3, operator, core, custom, ns, bucket):
    create(custom, ns, phoenixjob("sp", bucket, lab_s3.url, image=lab.trainer_image, env=LONG))
    wait(lambda: running(core, ns, pod_name("sp", "train", 1)), 60, "attempt 1 running")
    wait(lambda: has_checkpoints(lab_s3, bucket, 1), 60, "a checkpoint")
    patch_spec(custom, ns, "sp", {"suspend": True})
    wait(lambda: (p := pod_or_none(core, ns, pod_name("sp", "train", 1))) is None
         or p.status.phase == "Failed", 60, "pod stopped")
    job = wait(lambda: (j := get(custom, ns, "sp")).get("status", {}).get("phase") == "Suspended" and j,
               30, "Suspended")
    assert phase_status(job)["preemptions"] == 0
    time.sleep(2)
    assert pod_or_none(core, ns, pod_name("sp", "train", 2)) is None
    patch_spec(custom, ns, "sp", {"suspend": False})
    pod2 = wait(lambda: pod_or_none(core, ns, pod_name("sp", "train", 2)), 60, "attempt 2 after resume")
    assert env_of(pod2).get("PHOENIX_RESUME_FROM")
    job = wait(lambda: (j := get(custom, ns, "sp")).get("status", {}).get("phase") == "Running" and j,
               30, "Running again")
    assert phase_status(job)["preemptions"] == 0 and phase_status(job)["failures"] == 0


def test_failed_phase_blocks_dependents_but_independent_eval_runs(
        lab, lab_s3, operator, core, custom, ns, bucket):
    body = phoenixjob("blk", bucket, lab_s3.url, image=lab.trainer_image, phases=("train", "finetune", "eval"),
                      env={"FAKE_STEPS": 6, "FAKE_FAIL_ATTEMPTS": "1", "FAKE_FAIL_AFTER": 1},
                      recovery={"maxFailures": 0},
                      extra_phase={"eval": {"independent": True, "dependsOn": ["train"]}})
    create(custom, ns, body)
    job = wait(lambda: (j := get(custom, ns, "blk")).get("status", {}).get("phase") == "Failed" and j,
               90, "job Failed")
    states = {p["name"]: p["state"] for p in job["status"]["phases"]}
    # eval's attempt 1 also fails (same fake trainer knob), but it ran: not Blocked
    assert states["train"] == "Failed" and states["finetune"] == "Blocked"
    assert states["eval"] in ("Failed", "Succeeded")
    assert phase_status(job, "eval")["attempts"] == 1
    assert pod_or_none(core, ns, pod_name("blk", "finetune", 1)) is None


def test_deleting_the_job_deletes_its_pods(lab, lab_s3, operator, core, custom, ns, bucket):
    create(custom, ns, phoenixjob("del", bucket, lab_s3.url, image=lab.trainer_image, env=LONG))
    wait(lambda: running(core, ns, pod_name("del", "train", 1)), 60, "attempt 1 running")
    job = get(custom, ns, "del")
    assert not job["metadata"].get("finalizers")  # no finalizer: owner references suffice
    custom.delete_namespaced_custom_object("phoenix.dev", "v1alpha1", ns, "phoenixjobs", "del")
    wait(lambda: not trainer_pods(core, ns, "del"), 90, "pods garbage-collected")
    time.sleep(2)
    assert not trainer_pods(core, ns, "del")  # and the operator did not resurrect them


def test_operator_killed_between_intent_and_create(lab, lab_s3, operator, core, custom, ns, bucket):
    """The exact crash window: the dead operator had written the status naming attempt 2
    (intent, no podUID) but never created the pod. The restarted operator creates that very
    pod - same name, same attempt - and nothing else."""
    create(custom, ns, phoenixjob("iw", bucket, lab_s3.url, image=lab.trainer_image, env=LONG))
    wait(lambda: running(core, ns, pod_name("iw", "train", 1)), 60, "attempt 1 running")
    wait(lambda: phase_status(get(custom, ns, "iw")).get("podUID"), 30, "podUID recorded")
    operator.kill()
    try:
        lab.evict(ns, pod_name("iw", "train", 1))
        wait(lambda: (p := pod_or_none(core, ns, pod_name("iw", "train", 1))) is None
             or p.status.phase == "Failed", 30, "attempt 1 ended")
        job = get(custom, ns, "iw")
        status = job["status"]
        ps = status["phases"][0]
        ps.update(state="Running", attempts=2, pod=pod_name("iw", "train", 2), preemptions=1)
        ps.pop("podUID")
        status["phase"] = "Running"
        custom.patch_namespaced_custom_object_status(
            "phoenix.dev", "v1alpha1", ns, "phoenixjobs", "iw", {"status": status})
    finally:
        operator.start()
    pod2 = wait(lambda: running(core, ns, pod_name("iw", "train", 2)), 60, "attempt 2 created and running")
    assert env_of(pod2)["PHOENIX_ATTEMPT"] == "2"
    ps = wait(lambda: (s := phase_status(get(custom, ns, "iw"))).get("podUID") and s, 30,
              "podUID of attempt 2 recorded")
    assert ps["podUID"] == pod2.metadata.uid and ps["preemptions"] == 1
    time.sleep(2)
    assert [p.metadata.name for p in trainer_pods(core, ns, "iw")] == [pod_name("iw", "train", 2)]


def test_foreign_pod_holding_the_name_gives_a_condition_not_a_loop(
        lab, lab_s3, operator, core, custom, ns, bucket):
    """A pod that is not the job's holds the first attempt's name: the job says so in a
    condition and one event, never adopts or deletes it, and starts once it is gone."""
    name = pod_name("fp", "train", 1)
    # Stays Pending (no such node): costs nothing.
    core.create_namespaced_pod(ns, python_pod(name, "pass", image=lab.trainer_image,
                                              labels={"app": "someone-else"},
                                              node_selector={"no-such-node": "true"}))
    create(custom, ns, phoenixjob("fp", bucket, lab_s3.url, image=lab.trainer_image, env=LONG))

    def conflict():
        conds = {c["type"]: c for c in (get(custom, ns, "fp").get("status") or {}).get(
            "conditions") or ()}
        return conds.get("PodConflict", {}).get("status") == "True" and conds["PodConflict"]
    cond = wait(conflict, 30, "PodConflict condition")
    assert f"{ns}/{name}" in cond["message"] and "no owner" in cond["message"]
    time.sleep(5)  # a loop would show as more events, creates or deletes meanwhile
    assert [e.reason for e in events(core, ns, "fp")].count("PodConflict") == 1
    assert core.read_namespaced_pod(name, ns).metadata.labels == {"app": "someone-else"}
    assert phase_status(get(custom, ns, "fp"))["attempts"] == 1
    core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
    pod = wait(lambda: (p := pod_or_none(core, ns, name)) and p.metadata.owner_references and p,
               60, "the job's own pod once the name is free")
    assert pod.metadata.owner_references[0].kind == "PhoenixJob"
    wait(lambda: not conflict(), 10, "PodConflict cleared")
