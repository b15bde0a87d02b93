"""The `phoenix` CLI against a real job, and recovery from losing a whole node."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pxj_helpers import create, env_of, get, phase_status, phoenixjob, pod_or_none, wait

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def phoenix_cli(lab, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "phoenix_operator.cli", *args],
                         env=dict(os.environ, KUBECONFIG=lab.kubeconfig), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cli_status_and_checkpoints(lab, operator, core, custom, ns, bucket):
    create(custom, ns, phoenixjob("cli", bucket, lab.s3.url, phases=("pretrain", "eval"),
                                  env={"FAKE_STEPS": 10, "FAKE_CKPT_EVERY": 5}))
    wait(lambda: get(custom, ns, "cli").get("status", {}).get("phase") == "Succeeded", 90,
         "job Succeeded")
    text = phoenix_cli(lab, "status", "cli", "-n", ns)
    assert f"PhoenixJob {ns}/cli: Succeeded" in text
    assert "phase pretrain [Succeeded]" in text and "phase eval [Succeeded]" in text
    assert "last checkpoint: step 10" in text
    text = phoenix_cli(lab, "checkpoints", "cli", "-n", ns, "--strict")
    assert "ok  step       10" in text and "BAD" not in text
    assert lab.s3.secret_key not in text


def test_node_loss_is_a_preemption_replaced_before_pod_gc(lab, operator, core, custom, ns,
                                                          bucket):
    """The Node is deleted and its processes die without a word: the pod stays Running in
    the API until pod GC (40-60 s). The operator notices the missing Node, force-deletes the
    pod and creates the next attempt long before that."""
    create(custom, ns, phoenixjob("nl", bucket, lab.s3.url, env={
        "FAKE_STEPS": 100000, "FAKE_STEP_SECONDS": 0.05, "FAKE_CKPT_EVERY": 5}))
    pod = wait(lambda: (p := pod_or_none(core, ns, "nl-train-1")) and p.status.phase == "Running"
               and p, 60, "attempt 1 running")
    lost = time.monotonic()
    lab.lose_node(pod.spec.node_name)
    pod2 = wait(lambda: pod_or_none(core, ns, "nl-train-2"), 15,
                "replacement after node loss (well before pod GC)")
    took = time.monotonic() - lost
    assert env_of(pod2)["PHOENIX_ATTEMPT"] == "2"
    old = pod_or_none(core, ns, "nl-train-1")
    assert old is None or old.metadata.uid != pod.metadata.uid, "old pod left to pod GC"
    ps = wait(lambda: (s := phase_status(get(custom, ns, "nl"))).get("attempts") == 2 and s, 30,
              "status attempt 2")
    assert ps["preemptions"] == 1 and ps["failures"] == 0
    assert ps["lastFailure"]["cause"] == "preemption"
    assert ps["lastFailure"]["reason"] == "NodeLost", ps["lastFailure"]
    assert pod.spec.node_name in ps["lastFailure"]["message"]
    print(f"node loss -> replacement created in {took:.2f}s")

