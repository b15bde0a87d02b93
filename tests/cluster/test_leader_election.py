"""Two operator replicas on one Lease, against the lab's API server, S3 and kubelets: one
leads and writes, the other watches; killed, the leader is replaced within the lease
duration; drained (SIGTERM), at once; partitioned from the API server (a relay that stops
carrying its bytes, storage still reachable) or paused (SIGSTOP), then healed, it writes
nothing - asserted on the API server's audit log, the pods and the fence in storage.

Short timings (lease 4 s, renew deadline 3 s, retry 0.5 s) keep the suite quick; the
chart's defaults (15/10/2) and the figures on the lab's real nodes are in
benchmarks/bench_failover.py."""
from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timezone

import pytest
from kubernetes import client

from operator_process import OPERATOR_NS as LEASE_NS
from operator_process import RELEASE, OperatorProcess
from partition import Partition
from phoenix_operator.podspec import pod_name
from pxj_helpers import (create, create_job_namespace, get, phase_status, phoenixjob,
                         pod_or_none, wait)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TIMINGS = {"PHOENIX_LEASE_DURATION_SECONDS": "4", "PHOENIX_RENEW_DEADLINE_SECONDS": "3",
           "PHOENIX_RETRY_PERIOD_SECONDS": "0.5"}
WRITES = ("create", "update", "patch", "delete", "deletecollection")


class Pair:
    """Two replicas, ``op-a`` and ``op-b``, electing on the chart's Lease; jobs in pxl-*."""

    def __init__(self, lab, kubeconfig, log_dir):
        self.lab = lab
        # The chart's Lease name for release "phx" (its Role grants get/update on that one)
        self.lease = f"{RELEASE}-operator"
        # AWS_CA_BUNDLE: the lab CA, which signed SeaweedFS's certificate (lab_s3_server)
        env = dict(TIMINGS, PHOENIX_LEADER_ELECTION="true", PHOENIX_LEASE_NAME=self.lease,
                   PHOENIX_LEASE_NAMESPACE=LEASE_NS, AWS_CA_BUNDLE=str(lab.pki.ca_cert))
        # op-a reaches the API server through a relay that can be cut (a partition).
        self.relay = Partition(lab.host_ip, (lab.host_ip, lab.ports.apiserver))
        configs = {"op-a": self.relay.kubeconfig(kubeconfig, log_dir / "op-a.kubeconfig"),
                   "op-b": kubeconfig}
        self.ops = {name: OperatorProcess(configs[name], log_dir, lab.s3.url,
                                          namespaces="pxl-*", env=dict(env, PHOENIX_POD_NAME=name),
                                          name=name)
                    for name in ("op-a", "op-b")}
        self.api = lab.api_client()
        self.leases = client.CoordinationV1Api(self.api)

    def record(self) -> dict:
        return self.leases.read_namespaced_lease(self.lease, LEASE_NS).spec.to_dict()

    def holder(self) -> str | None:
        try:
            return self.record()["holder_identity"]
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def wait_leader(self, name: str, timeout: float) -> float:
        started = time.monotonic()
        wait(lambda: self.holder() == name, timeout, f"{name} holds lease {self.lease}",
             interval=0.05)
        return time.monotonic() - started

    def cut_off(self, name: str, how: str) -> None:
        assert name == "op-a"
        if how == "partitioned":
            self.relay.cut()
        else:
            self.ops[name].signal(signal.SIGSTOP)

    def heal(self, name: str, how: str) -> None:
        if how == "partitioned":
            self.relay.heal()
        else:
            self.ops[name].signal(signal.SIGCONT)

    def close(self):
        self.relay.heal()
        for op in self.ops.values():
            if op.proc and op.proc.poll() is None:
                op.signal(signal.SIGCONT)
            op.stop()
        self.api.close()
        self.relay.close()


@pytest.fixture
def pair(lab, operator_rbac, tmp_path, pxl):
    # pxl first: kopf (1.45) never watches a namespace matching its pattern that is created
    # between its namespace listing and the start of its namespace watch (the watch's own
    # initial listing is ignored); a job namespace created just as op-b started was unseen
    # by op-b for the whole test
    p = Pair(lab, operator_rbac, tmp_path)
    p.ops["op-a"].start()
    p.wait_leader("op-a", 20)
    p.ops["op-b"].start()
    yield p
    p.close()


@pytest.fixture
def pxl(lab, core, lab_s3):
    name = create_job_namespace(lab, core, prefix="pxl", s3=lab_s3)
    yield name
    core.delete_namespace(name)


def metric(op: OperatorProcess, name: str) -> float:
    for line in op.metrics().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def long_job(lab, s3, bucket, name="el"):
    return phoenixjob(name, bucket, s3.url, image=lab.trainer_image,
                      env={"FAKE_STEPS": 100000, "FAKE_STEP_SECONDS": 0.05, "FAKE_CKPT_EVERY": 5})


def running(core, ns, job, attempt):
    return wait(lambda: (p := pod_or_none(core, ns, pod_name(job, "train", attempt)))
                and p.status.phase == "Running" and p, 60, f"attempt {attempt} running")


def fence(s3, bucket) -> dict:
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])
            if o["Key"].endswith("/fence.json")]
    assert len(keys) == 1, keys
    return json.loads(s3.client().get_object(Bucket=bucket, Key=keys[0])["Body"].read())


def test_one_leader_writes_and_a_standby_takes_over_within_the_lease_when_it_dies(
        lab, lab_s3, pair, core, custom, pxl, bucket):
    a, b = pair.ops["op-a"], pair.ops["op-b"]
    create(custom, pxl, long_job(lab, lab_s3, bucket))
    first = running(core, pxl, "el", 1)
    wait(lambda: metric(b, "phoenix_operator_leader_info") == 1, 10, "op-b sees the leader")
    assert metric(a, "phoenix_operator_leader") == 1 and metric(b, "phoenix_operator_leader") == 0
    assert metric(a, "phoenix_pods_created_total") == 1
    assert metric(b, "phoenix_pods_created_total") == 0  # the standby wrote nothing
    term = pair.record()["lease_transitions"]
    assert fence(lab_s3, bucket)["leader"] == {"term": term, "leader": "op-a",
                                               "lease": fence(lab_s3, bucket)["leader"]["lease"]}

    # The leader's node dies with it: no release. Its trainer pod goes at the same time.
    a.kill()
    lost = time.monotonic()
    core.delete_namespaced_pod(first.metadata.name, pxl, grace_period_seconds=0)
    wait(lambda: pod_or_none(core, pxl, pod_name("el", "train", 2)), 4 + 5,
         "op-b creates attempt 2 within the lease duration (+ a pass)")
    took = time.monotonic() - lost
    assert pair.holder() == "op-b" and pair.record()["lease_transitions"] == term + 1
    assert fence(lab_s3, bucket)["leader"]["leader"] == "op-b"
    assert fence(lab_s3, bucket)["leader"]["term"] == term + 1
    assert metric(b, "phoenix_operator_leader") == 1
    ps = wait(lambda: (s := phase_status(get(custom, pxl, "el"))).get("attempts") == 2 and s,
              20, "status attempt 2")
    assert ps["preemptions"] + ps["failures"] == 1
    print(f"leader killed -> replacement pod by the new leader in {took:.2f}s (lease 4 s)")

    # The old leader comes back (same name, a new process): it stays a standby.
    a.start()
    time.sleep(2)
    assert pair.holder() == "op-b" and metric(a, "phoenix_operator_leader") == 0


def test_a_drained_leader_hands_over_at_once(lab, pair):
    time.sleep(1)  # op-b is up and trying
    started = time.monotonic()
    pair.ops["op-a"].stop()  # SIGTERM, as a drain or a rolling update sends it
    took = pair.wait_leader("op-b", 4)
    print(f"SIGTERM of the leader -> op-b leads in {time.monotonic() - started:.2f}s")
    assert took < 2.5, f"handover took {took:.2f}s: the lease was not released"
    assert "LEADERSHIP op-a released the lease" in pair.ops["op-a"].log_tail(200)
    events = client.CoreV1Api(pair.api).list_namespaced_event(LEASE_NS).items
    reasons = {(e.reason, e.message.split()[0]) for e in events
               if e.involved_object.kind == "Lease" and e.involved_object.name == pair.lease}
    assert {("LeaderElected", "op-a"), ("LeaderReleased", "op-a"),
            ("LeaderElected", "op-b")} <= reasons


# full for paused: make test cuts the leader off by a partition (the dangerous case: it keeps
# running with storage reachable)
@pytest.mark.parametrize("how", ["partitioned", pytest.param("paused", marks=pytest.mark.full)])
def test_a_cut_off_leader_writes_nothing_after_it_lost_the_lease(
        lab, lab_s3, pair, core, custom, pxl, bucket, how):
    """``partitioned``: op-a's connections to the API server stop carrying bytes (a relay it
    reaches the API server through stops relaying; storage stays reachable, the dangerous
    case) while it keeps running - its renewals fail, its gate closes after the renew
    deadline, its requests in flight arrive after the heal. ``paused``: the process stops
    (SIGSTOP: a VM paused, a long GC) and resumes with its timers overdue and a backlog of
    watch events. Either way, after the lease moved, nothing it sends succeeds."""
    a, b = pair.ops["op-a"], pair.ops["op-b"]
    create(custom, pxl, long_job(lab, lab_s3, bucket, how))
    first = running(core, pxl, how, 1)
    cut_at = datetime.now(timezone.utc)
    pair.cut_off("op-a", how)
    pair.wait_leader("op-b", 4 + 3)
    # The new leader acts: a preemption it must recover while the old one is away.
    core.delete_namespaced_pod(first.metadata.name, pxl, grace_period_seconds=0)
    running(core, pxl, how, 2)
    fenced = fence(lab_s3, bucket)
    assert fenced["leader"]["leader"] == "op-b" and fenced["attempt"] == 2

    healed = datetime.now(timezone.utc)
    pair.heal("op-a", how)
    wait(lambda: "LEADERSHIP op-a stopped leading" in a.log_tail(400), 15,
         "op-a notices it lost the lease")
    time.sleep(6)  # a resync (5 s) and the backlog's passes
    writes = lab.audit_writes("phoenix-operator/op-a")
    # Requests sent before the cut may arrive late; none may succeed (a renewal with the old
    # resourceVersion, a status patch with the old one: 409).
    after = [e for e in writes if _ts(e["requestReceivedTimestamp"]) > healed]
    seen = [(e["verb"], e["objectRef"]["resource"], e["responseStatus"]["code"]) for e in after]
    print(f"{how}: op-a's writes that reached the API server after the heal: {seen}")
    late = [e for e in after if (e.get("responseStatus") or {}).get("code", 0) < 400]
    assert late == [], "a deposed leader wrote:\n" + "\n".join(
        f"{e['verb']} {e['requestURI']} {e.get('responseStatus')}" for e in late)
    assert [e for e in writes if _ts(e["requestReceivedTimestamp"]) < cut_at], (
        "the audit log names op-a's writes while it led (else this proves nothing)")
    assert fence(lab_s3, bucket) == fenced  # storage: the new leader's fence stands
    names = sorted(p.metadata.name for p in core.list_namespaced_pod(
        pxl, label_selector=f"phoenix.dev/job={how}").items)
    assert names == [pod_name(how, "train", 2)], names
    assert phase_status(get(custom, pxl, how))["attempts"] == 2
    assert pair.holder() == "op-b" and metric(b, "phoenix_operator_leader") == 1


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
