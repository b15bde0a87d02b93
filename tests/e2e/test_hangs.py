"""Hung, not ended: a trainer pod stays Running while nothing trains, and the operator ends it.

Three real training jobs (the example MLP in the trainer image, on the lab's spot nodes) each
hang once in attempt 1, in a different way, while the same training runs undisturbed as the
reference:

- ``sigstop``: the training process is stopped with SIGSTOP through containerd (frozen: it
  can neither train nor dump its own stacks; its heartbeat stops);
- ``worker``: its DataLoader worker blocks for ever (the main loop waits on it);
- ``storage``: the loop makes a storage call to an S3 endpoint that accepts the connection
  and never answers.

Each must be detected within the job's ``hangTimeoutSeconds`` (plus the documented slack),
end as one failure with reason ``Hung`` naming the rank that stopped first, have its stack
dump in storage showing the blocking frame (none for the frozen process: ``/proc`` is all
anyone could read of it), and Succeed with final weights equal to the reference's.
"""
from __future__ import annotations

import signal

import pytest

from kube_helpers import wait_for
from phoenix_e2e import CREDENTIALS_SECRET, GROUP, PLURAL, VERSION, phase_status, unique
from phoenix_lab import samples
from phoenix_operator.podspec import pod_name
from phoenix_trainer.core.heartbeat import DUMP_GRACE_SECONDS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TIMEOUT = 20
HANG_AT = 60
BASE = ["--workers", "1"]
STEPS = 200
# The frame each injected hang blocks in (examples/train_mlp.py).
FRAMES = {"worker": "worker_waits_for_ever", "storage": "storage_call_that_never_returns"}
GANG_STEPS = 120  # the gang tests' runs (argparse: the last --steps wins over test_gang's)


@pytest.fixture(scope="module")
def lab_target(e2e):
    if "lab" not in e2e.extra:
        pytest.skip("hang injection needs the lab (SIGSTOP through containerd)")
    return e2e.extra["lab"], e2e.extra["release"]


def test_hangs_are_detected_dumped_ended_and_resumed_exactly(e2e, kube, e2e_bucket, submit_job,
                                                             lab_target):
    lab, release = lab_target
    ns = e2e.namespace
    s3 = e2e.extra["s3_server"].endpoint  # this parameter's lab S3 server
    names = {kind: unique(f"hang-{kind}") for kind in ("sigstop", "worker", "storage")}
    for kind, name in names.items():
        extra = BASE if kind == "sigstop" else [*BASE, "--hang-at", str(HANG_AT), "--hang", kind]
        cfg = samples.TrainConfig(steps=STEPS, step_delay=0.04, checkpoint_every=25,
                                  extra_args=extra)
        body = samples.phoenixjob(name, ns, cfg, f"s3://{e2e_bucket}/{name}", s3.url,
                                  image=lab.trainer_image, credentials_secret=CREDENTIALS_SECRET,
                                  max_failures=1)
        body["spec"]["recovery"]["hangTimeoutSeconds"] = TIMEOUT
        submit_job(body)
    ref_cfg = samples.TrainConfig(steps=STEPS, step_delay=0.04, checkpoint_every=25,
                                  extra_args=BASE)
    reference = samples.ReferenceRun(lab, ns, unique("hang-ref"), ref_cfg,
                                     f"s3://{e2e_bucket}/hang-ref-{names['sigstop']}",
                                     credentials_secret=CREDENTIALS_SECRET, s3=s3)
    submit_job(reference.manifest)

    def job(name):
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def diagnose():
        return "\n".join(f"{k}: {job(n).get('status')}" for k, n in names.items()) + \
            f"\noperator:\n{release.operator_log()[-6000:]}"

    stopped = pod_name(names["sigstop"], "train", 1)
    wait_for(lambda: (p := samples.logged_progress(lab, ns, stopped)) and p[0] >= HANG_AT,
             300, 1, f"{stopped} past step {HANG_AT}", diagnose=diagnose)
    lab.kill_pod(ns, stopped, signal.SIGSTOP)

    finals = {kind: wait_for(lambda n=name: (j := job(n)) and (j.get("status") or {}).get("phase")
                             in ("Succeeded", "Failed") and j, 600, 2, f"{name} finished",
                             diagnose=diagnose)
              for kind, name in names.items()}
    reference.wait(timeout=300)
    for kind, final in finals.items():
        train = phase_status(final)
        assert final["status"]["phase"] == "Succeeded", (kind, diagnose())
        assert train["failures"] == 1 and train["preemptions"] == 0, (kind, train)
        assert train["hangs"] == 1 and train["lastFailure"]["reason"] == "Hung", (kind, train)
        hang = train["lastHang"]
        assert hang["attempt"] == 1 and hang["rank"] == 0, (kind, hang)
        assert hang["pod"] == pod_name(names[kind], "train", 1), (kind, hang)
        # Honoured: never before the timeout; after it by at most a heartbeat, a read and (a
        # frozen process writes no dump) the wait that tells frozen from still dumping.
        slack = 15 + (DUMP_GRACE_SECONDS if kind == "sigstop" else 0)
        assert TIMEOUT <= hang["stalledSeconds"] <= TIMEOUT + slack, (kind, hang)
        storage = samples.open_phase_storage(f"s3://{e2e_bucket}/{names[kind]}/train", s3)
        if kind == "sigstop":
            assert hang["stackDumps"] == [], hang
        else:
            assert len(hang["stackDumps"]) == 1, hang
            key = hang["stackDumps"][0].split("/train/", 1)[1]
            text = storage.get_bytes(key).decode()
            assert FRAMES[kind] in text, text[-3000:]
        events = kube.core.list_namespaced_event(
            ns, field_selector=f"involvedObject.name={names[kind]},reason=Hung").items
        assert len(events) == 1 and "rank 0" in events[0].message, [e.message for e in events]
        same, uri = samples.final_weights_equal(storage, reference.storage())
        assert same, (f"{kind}: final weights at {uri} differ from the uninterrupted run's: "
                      f"{samples.divergence(storage, reference.storage())}")


def test_a_gang_rank_that_stops_before_its_collective_is_named_and_the_gang_restarts(
        e2e, kube, e2e_bucket, submit_job, tmp_path, monkeypatch):
    """2 pods x 2 torchrun processes (DDP, gloo): rank 1 blocks before step 41's collective, the
    other ranks wait in it (their collective timeout is longer than the hang timeout). The
    operator names rank 1 (pod member 0) as the one that stopped first, every rank's dump is in
    storage, the gang restarts as a unit and ends with the undisturbed gang's weights."""
    if "lab" not in e2e.extra:
        pytest.skip("needs the lab's nodes")
    from test_gang import gang_job
    from phoenix_trainer.core.storage import open_storage
    from trainer_procs import gang_state, tensors_equal

    ns = e2e.namespace
    ref_name = submit_job(gang_job(e2e, unique("hgang-ref"), e2e_bucket, "--step-delay=0",
                                   f"--steps={GANG_STEPS}"))
    body = gang_job(e2e, unique("hgang"), e2e_bucket, "--hang-at=40", "--hang-rank=1",
                    f"--steps={GANG_STEPS}", "--step-delay=0.05")
    for var in body["spec"]["template"]["spec"]["containers"][0]["env"]:
        if var["name"] == "PHOENIX_COLLECTIVE_TIMEOUT_SECONDS":
            var["value"] = "180"  # the peers wait in the collective; the operator ends it first
    body["spec"]["recovery"]["hangTimeoutSeconds"] = TIMEOUT
    name = submit_job(body)

    def finished(job_name):
        return wait_for(lambda: (j := kube.custom.get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, job_name)) and (j.get("status") or {}).get("phase")
            in ("Succeeded", "Failed") and j, 600, 2, f"{job_name} finished",
            diagnose=lambda: e2e.operator_logs())

    done = finished(name)
    assert finished(ref_name)["status"]["phase"] == "Succeeded"
    assert done["status"]["phase"] == "Succeeded", done["status"]
    ps = phase_status(done)
    assert (ps["failures"], ps["hangs"], ps["preemptions"]) == (1, 1, 0), ps
    hang = ps["lastHang"]
    assert hang["rank"] == 1 and hang["pod"] == pod_name(name, "train", 1, 0), hang
    # Every rank that could still write names its dump before the decision. A rank whose
    # storage writes stall reads as frozen, and the operator rightly waits no longer for its
    # dump: that happened on the lab while a node's bridge changed its MAC whenever a
    # neighbouring pod ended (fixed in lab/phoenix_lab/network.py: every pod on the node lost
    # its gateway for tens of seconds), and can happen on any cluster, so any subset of dumps
    # is accepted. The stopped rank's dump is in storage either way (below).
    assert hang["step"] <= 40 and len(hang["stackDumps"]) <= 4, hang
    # never before the timeout; a frozen heartbeat counts its stall from its last write
    assert TIMEOUT <= hang["stalledSeconds"] <= TIMEOUT + DUMP_GRACE_SECONDS + 60, hang
    monkeypatch.setenv("AWS_ENDPOINT_URL", e2e.s3.local_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", e2e.s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", e2e.s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    prefix, ref = f"s3://{e2e_bucket}/{name}/train", f"s3://{e2e_bucket}/{ref_name}/train"
    dump = wait_for(lambda: open_storage(prefix).get_bytes("hangs/attempt-1/rank-1.txt"), 60, 2,
                    "rank 1's stack dump in storage").decode()
    assert "rank_stops_before_its_collective" in dump, dump[-3000:]
    left = [p.metadata.name for p in kube.core.list_namespaced_pod(
        ns, label_selector=f"phoenix.dev/job={name}").items if p.status.phase in ("Running", "Pending")]
    assert left == [], f"members of the hung gang still running: {left}"
    got, want = gang_state(prefix, tmp_path, GANG_STEPS), gang_state(ref, tmp_path, GANG_STEPS)
    assert tensors_equal(got, want), "final weights differ from the undisturbed gang's"


# full: stragglers (decide/hangs.py's rule is unit-tested; make test names a hung gang's rank)
@pytest.mark.full
def test_a_slow_gang_rank_is_named_a_straggler_with_its_pod_and_node(e2e, kube, e2e_bucket,
                                                                      submit_job):
    """2 pods x 1 process (DDP): rank 1 spends 0.2 s more per step before its collective. The
    Straggler condition and one event name rank 1, its pod and its node within
    STRAGGLER_MIN_STEPS timed steps plus a heartbeat (10 s) and a pass (at most 30 s apart
    while it runs); the job still succeeds."""
    if "lab" not in e2e.extra:
        pytest.skip("needs the lab's nodes")
    from test_gang import gang_job

    ns = e2e.namespace
    body = gang_job(e2e, unique("slow"), e2e_bucket, "--slow-rank=1", "--slow-seconds=0.2",
                    "--steps=300", "--step-delay=0")
    body["spec"]["phases"][0]["nprocPerNode"] = 1
    name = submit_job(body)

    def job():
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def straggler():
        conds = {c["type"]: c for c in (job().get("status") or {}).get("conditions") or ()}
        c = conds.get("Straggler")
        return c if c and c["status"] == "True" else None

    cond = wait_for(straggler, 300, 2, "the Straggler condition", diagnose=lambda: str(job().get("status")))
    member = pod_name(name, "train", 1, 1)
    node = kube.core.read_namespaced_pod(member, ns).spec.node_name
    assert f"rank 1 (pod {member} on node {node})" in cond["message"], cond
    slow = phase_status(job())["progress"]["stragglers"]
    assert [s["rank"] for s in slow] == [1] and slow[0]["computeSeconds"] >= 0.2, slow
    events = kube.core.list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name},reason=Straggler").items
    assert len(events) == 1 and member in events[0].message, [e.message for e in events]
    done = wait_for(lambda: (j := job()) and (j.get("status") or {}).get("phase")
                    in ("Succeeded", "Failed") and j, 600, 2, f"{name} finished")
    assert done["status"]["phase"] == "Succeeded", done["status"]
