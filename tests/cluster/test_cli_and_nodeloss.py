"""The `phoenixctl` CLI (status, checkpoints, reset) against a real job, and recovery from
losing a whole node."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from phoenix_operator.podspec import pod_name
from phoenix_trainer.core.layout import step_dir_name

from pxj_helpers import (create, env_of, events, get, patch_spec, phase_status, phoenix_cli, phoenixjob,
                         pod_or_none, wait)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_cli_status_and_checkpoints(lab, lab_s3, operator, core, custom, ns, bucket):
    create(custom, ns, phoenixjob("cli", bucket, lab_s3.url, image=lab.trainer_image, phases=("pretrain", "eval"),
                                  env={"FAKE_STEPS": 10, "FAKE_CKPT_EVERY": 5}))
    wait(lambda: get(custom, ns, "cli").get("status", {}).get("phase") == "Succeeded", 90,
         "job Succeeded")
    # The start-up's image pull, from the kubelet's Pulled event (the operator lists events
    # with the chart's RBAC): the lab's nodes boot with the image, so no pull.
    pull = wait(lambda: phase_status(get(custom, ns, "cli"), "pretrain").get("imagePull"), 30,
                "the pretrain pod's image pull in the status")
    assert pull["present"] is True and pull["attempt"] == 1 and "seconds" not in pull
    text = phoenix_cli(lab, "status", "cli", "-n", ns)
    assert f"PhoenixJob {ns}/cli: Succeeded" in text
    assert "start-up (this attempt, pod " in text and "image already on the node" in text
    assert "phase pretrain [Succeeded]" in text and "phase eval [Succeeded]" in text
    assert "last checkpoint: step 10" in text
    text = phoenix_cli(lab, "checkpoints", "cli", "-n", ns, "--strict")
    assert "ok  step       10" in text and "BAD" not in text
    assert lab_s3.secret_key not in text


def test_node_loss_is_a_preemption_replaced_before_pod_gc(lab, lab_s3, operator, core, custom, ns,
                                                          bucket):
    """The Node is deleted and its processes die without a word: the pod stays Running in
    the API until pod GC (40-60 s). The operator notices the missing Node, force-deletes the
    pod and creates the next attempt long before that."""
    create(custom, ns, phoenixjob("nl", bucket, lab_s3.url, image=lab.trainer_image, env={
        "FAKE_STEPS": 100000, "FAKE_STEP_SECONDS": 0.05, "FAKE_CKPT_EVERY": 5}))
    pod = wait(lambda: (p := pod_or_none(core, ns, pod_name("nl", "train", 1))) and p.status.phase == "Running"
               and p, 60, "attempt 1 running")
    lost = time.monotonic()
    replacement = lab.lose_node(pod.spec.node_name)
    pod2 = wait(lambda: pod_or_none(core, ns, pod_name("nl", "train", 2)), 15,
                "replacement after node loss (well before pod GC)")
    took = time.monotonic() - lost
    assert env_of(pod2)["PHOENIX_ATTEMPT"] == "2"
    old = pod_or_none(core, ns, pod_name("nl", "train", 1))
    assert old is None or old.metadata.uid != pod.metadata.uid, "old pod left to pod GC"
    ps = wait(lambda: (s := phase_status(get(custom, ns, "nl"))).get("attempts") == 2 and s, 30,
              "status attempt 2")
    assert ps["preemptions"] == 1 and ps["failures"] == 0
    assert ps["lastFailure"]["cause"] == "preemption"
    assert ps["lastFailure"]["reason"] == "NodeLost", ps["lastFailure"]
    assert pod.spec.node_name in ps["lastFailure"]["message"]
    print(f"node loss -> replacement created in {took:.2f}s")
    lab.wait_nodes_ready([replacement.name])  # leave the lab whole: its GPUs advertised


def test_reset_reruns_a_failed_phase_from_its_checkpoint(lab, lab_s3, operator, core, custom, ns,
                                                         bucket):
    env = {"FAKE_STEPS": 12, "FAKE_CKPT_EVERY": 5, "FAKE_FAIL_ATTEMPTS": "1",
           "FAKE_FAIL_AFTER": 7}
    body = phoenixjob("rst", bucket, lab_s3.url, image=lab.trainer_image, phases=("train", "eval"), env=env,
                      recovery={"maxFailures": 0})
    create(custom, ns, body)
    job = wait(lambda: (j := get(custom, ns, "rst")).get("status", {}).get("phase") == "Failed"
               and j, 90, "job Failed")
    assert [p["state"] for p in job["status"]["phases"]] == ["Failed", "Blocked"]
    # The user fixes the cause (here: the fake trainer's failure knob) and resets.
    fixed = dict(env, FAKE_FAIL_ATTEMPTS="")
    template = phoenixjob("rst", bucket, lab_s3.url, image=lab.trainer_image, env=fixed)["spec"]["template"]
    patch_spec(custom, ns, "rst", {"template": template})
    text = phoenix_cli(lab, "reset", "rst", "-n", ns)
    assert "phase train, eval reset to Pending" in text
    job = wait(lambda: (j := get(custom, ns, "rst")).get("status", {}).get("phase") == "Succeeded"
               and j, 90, "job Succeeded after reset")
    ps = phase_status(job)
    assert ps["attempts"] == 2 and ps["failures"] == 0 and ps["state"] == "Succeeded"
    assert phase_status(job, "eval")["state"] == "Succeeded"
    pod2 = core.read_namespaced_pod(pod_name("rst", "train", 2), ns)
    assert env_of(pod2)["PHOENIX_RESUME_FROM"].endswith(step_dir_name(5))
    assert "PhaseReset" in {e.reason for e in events(core, ns, "rst")}
    # nothing left to reset; and a running job is not reset without --force
    assert "nothing to reset" in phoenix_cli(lab, "reset", "rst", "-n", ns)


def test_reset_refuses_while_running(lab, lab_s3, operator, core, custom, ns, bucket):
    create(custom, ns, phoenixjob("rr", bucket, lab_s3.url, image=lab.trainer_image, phases=("train", "eval"), env={
        "FAKE_STEPS": 100000, "FAKE_STEP_SECONDS": 0.05, "FAKE_FAIL_ATTEMPTS": "1"},
        recovery={"maxFailures": 0}, extra_phase={"eval": {
            "independent": True, "env": [{"name": "FAKE_FAIL_ATTEMPTS", "value": ""}]}}))
    # train fails at once; the independent eval phase then runs (its attempt 1 is long)
    wait(lambda: (s := phase_status(get(custom, ns, "rr"), "eval")).get("state") == "Running"
         and s, 60, "eval running after train failed")
    out = subprocess.run([sys.executable, "-m", "phoenix_operator.kubectl_phoenix", "reset", "rr",
                          "-n", ns],
                         env=dict(os.environ, KUBECONFIG=lab.kubeconfig), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "--force" in out.stderr
    assert phase_status(get(custom, ns, "rr"))["state"] == "Failed"
