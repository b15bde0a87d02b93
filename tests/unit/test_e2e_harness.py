"""The e2e harness's reading of the operator replicas (`phoenix_e2e.Operators`): the leader
is the pod the Lease names, ready means every replica Ready, and the log puts the leader's
last. Checked against a fake kubectl, so the suite's own guards are known to work before a
cluster run depends on them."""
from __future__ import annotations

import json
import subprocess

import pytest

from e2e.phoenix_e2e import Operators

pytestmark = pytest.mark.unit


def _pod(name: str, *, ready: bool = True, phase: str = "Running", restarts: int = 0) -> dict:
    return {"metadata": {"name": name, "uid": f"{name}-uid"},
            "status": {"phase": phase,
                       "conditions": [{"type": "Ready", "status": str(ready)}],
                       "containerStatuses": [{"name": "operator", "ready": ready,
                                              "restartCount": restarts,
                                              "state": {"running": {}}}]}}


class FakeKubectl:
    """Answers the few kubectl calls Operators makes, from `pods`, `holder`, `replicas`."""

    def __init__(self, pods, holder=None, replicas=2):
        self.pods, self.holder, self.replicas = pods, holder, replicas
        self.calls: list[tuple] = []

    def __call__(self, *args, check=True, input=None, timeout=120):
        self.calls.append(args)
        verb, what = args[2], args[3]

        def done(out="", rc=0, err=""):
            return subprocess.CompletedProcess(args, rc, out, err)
        if (verb, what) == ("get", "pods"):
            return done(json.dumps({"items": self.pods}))
        if (verb, what) == ("get", "lease"):
            if self.holder is None:
                return done(rc=1, err=f'Error from server (NotFound): leases "{args[4]}" not found')
            return done(json.dumps({"spec": {"holderIdentity": self.holder}}))
        if (verb, what) == ("get", "deployment"):
            return done(json.dumps({"spec": {"replicas": self.replicas}}))
        if verb == "logs":
            return done(f"log of {what}{' previous' if '--previous' in args else ''}\n")
        raise AssertionError(f"unexpected kubectl {args}")


def test_the_leader_is_the_running_pod_the_lease_names():
    kubectl = FakeKubectl([_pod("phx-operator-b"), _pod("phx-operator-a")])
    ops = Operators(kubectl, "phoenix-system", "phx")
    assert ops.leader() is None  # no Lease yet
    kubectl.holder = "phx-operator-b"
    assert ops.leader()["metadata"]["name"] == "phx-operator-b"
    assert ("-n", "phoenix-system", "get", "lease", "phx-operator", "-o", "json") in kubectl.calls
    kubectl.holder = "phx-operator-gone"  # a dead holder whose lease has not run out
    assert ops.leader() is None


def test_waiting_for_a_leader_times_out_saying_which_lease():
    ops = Operators(FakeKubectl([_pod("phx-operator-a")]), "phoenix-system", "phx")
    with pytest.raises(AssertionError, match="Lease phoenix-system/phx-operator"):
        ops.wait_leader(timeout=0.2, diagnose=lambda: "")


def test_a_lease_that_cannot_be_read_is_an_error_not_no_leader():
    ops = Operators(lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "Forbidden"),
                    "ns", "phx")
    with pytest.raises(AssertionError, match="Forbidden"):
        ops.holder()


def test_ready_needs_every_replica_the_deployment_asks_for():
    kubectl = FakeKubectl([_pod("phx-operator-a")], replicas=2)
    ops = Operators(kubectl, "ns", "phx")
    assert ops.all_ready() is None  # one of two
    kubectl.pods.append(_pod("phx-operator-b", ready=False))
    assert ops.all_ready() is None  # two, one not Ready
    kubectl.pods[1] = _pod("phx-operator-b")
    assert [p["metadata"]["name"] for p in ops.all_ready()] == ["phx-operator-a", "phx-operator-b"]


def test_logs_hold_every_replica_and_end_with_the_leader():
    kubectl = FakeKubectl([_pod("phx-operator-a", restarts=1), _pod("phx-operator-z")],
                          holder="phx-operator-a")
    log = Operators(kubectl, "ns", "phx").logs()
    assert log.index("log of phx-operator-z") < log.index("log of phx-operator-a previous") \
        < log.index("log of phx-operator-a\n")
    assert log.rstrip().endswith("log of phx-operator-a")
    assert "--- phx-operator-a (leader)" in log
