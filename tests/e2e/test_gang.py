"""A gang on real lab nodes: a PhoenixJob phase of 2 pods x 2 torchrun processes (DDP, gloo),
each pod on a different spot node, the members reaching each other by hostname through the
phase's headless Service. Against one undisturbed reference gang (the same gang on the same
nodes), two disrupted jobs:

- ``gangRestart: Whole`` (the default): one member evicted, one member's node lost - each
  restarts the whole gang from the newest checkpoint;
- ``gangRestart: Member`` with a spare (``recovery.standby``): the first spare evicted while
  it waits - another replaces it, the gang is not charged; one member SIGKILLed and the leading
  operator SIGKILLed right after it (the take-over is decided, or finished, by whichever
  operator leads next) - the waiting spare takes its place (no pod created); then the member
  hosting the rendezvous store evicted (it leaves alone at its next step) - the next spare, or
  a new pod if that spare is not there yet, takes it. Each time the survivor keeps its pod and
  hands the newcomer its state (0 steps lost).

(Each mode is one parametrization with its own reference run; ``make test`` runs ``Member``,
``make test-all`` both.) Both succeed with exact counts (each naming the member that caused it), no member of a dead
gang left running, every rank trained on exactly the samples of the reference run, and final
weights equal to the reference's, tensor for tensor."""
from __future__ import annotations

import json
import signal

import pytest

from kube_helpers import wait_for
from phoenix_e2e import GROUP, PLURAL, VERSION, phase_status, sample_job, unique
from phoenix_operator import constants as C
from phoenix_operator.podspec import pod_name
from phoenix_trainer.core.layout import checkpoint_steps
from phoenix_trainer.core.storage import open_storage
from trainer_procs import gang_state, tensors_equal

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
STEPS = 300
# The standby gang's test: time enough at 0.4 s a step for the standby gang to get ready
# before the eviction (300 steps took two minutes)
STANDBY_STEPS = 200
ARGS = ["--mode", "ddp", f"--steps={STEPS}", "--step-delay=0.1", "--log-every=10"]


def gang_job(e2e, name: str, bucket: str, *extra: str) -> dict:
    body = sample_job(e2e, name, bucket)
    spec = body["spec"]
    container = spec["template"]["spec"]["containers"][0]
    container["command"] = ["python", "-u", "-m", "torch.distributed.run",
                            "/app/examples/train_distributed.py", *ARGS, *extra]
    container["env"] += [{"name": "PHOENIX_COLLECTIVE_TIMEOUT_SECONDS", "value": "20"}]
    spec["template"]["spec"]["nodeSelector"] = {"phoenix.dev/spot": "true"}
    spec["template"]["spec"]["tolerations"] = [{"key": "phoenix.dev/spot", "operator": "Exists"}]
    spec["template"]["spec"]["affinity"] = {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {C.LABEL_JOB: name}},
            "topologyKey": "kubernetes.io/hostname"}]}}
    spec["phases"] = [{"name": "train", "replicas": 2, "nprocPerNode": 2}]
    spec["checkpoint"]["intervalSteps"] = 10
    spec["recovery"].update(maxFailures=2, backoff={"initialSeconds": 1, "maxSeconds": 5})
    return body


# full for Whole: make test restarts a whole gang in test_hangs.py (a rank stopped before its
# collective) and runs the in-place recovery (Member, with a spare) here
@pytest.mark.parametrize("mode", [pytest.param("Whole", marks=pytest.mark.full), "Member"])
def test_gang_survives_losses_whole_and_member_by_member(e2e, kube, e2e_bucket, submit_job,
                                                        tmp_path, monkeypatch, mode):
    if "lab" not in e2e.extra:
        pytest.skip("kills a container and loses a node: needs the lab")
    lab = e2e.extra["lab"]
    ns = e2e.namespace
    s3 = e2e.s3.client()

    def get(job_name: str) -> dict:
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job_name)

    def diagnose(job_name: str) -> str:
        pods = kube.core.list_namespaced_pod(ns, label_selector=f"{C.LABEL_JOB}={job_name}").items
        return (f"job status: {get(job_name).get('status')}\npods: "
                f"{[(p.metadata.name, p.spec.node_name, p.status.phase) for p in pods]}\n"
                f"operator log:\n{e2e.operator_logs()}")

    def finished(job_name: str, timeout: float) -> dict:
        return wait_for(lambda: (j := get(job_name)) and (j.get("status") or {}).get("phase")
                        in ("Succeeded", "Failed") and j, timeout, 2, f"{job_name} finished",
                        diagnose=lambda: diagnose(job_name))

    def newest_step(job_name: str) -> int:
        out = s3.list_objects_v2(Bucket=e2e_bucket, Prefix=f"{job_name}/train/")
        steps = [int(k.split("/step-")[1].split("/")[0]) for o in out.get("Contents", ())
                 if (k := o["Key"]).endswith("/manifest.json")]
        return max(steps, default=0)

    def gang_running(job_name: str, attempts: list[int]) -> list:
        pods = [kube.core.read_namespaced_pod(pod_name(job_name, "train", a, i), ns)
                for i, a in enumerate(attempts)]
        return pods if all(p.status.phase == "Running" for p in pods) else []

    def training(job_name: str, attempts: list[int], beyond: int) -> list:
        """The gang (member i's pod from attempts[i]) runs and has committed a checkpoint past
        ``beyond``."""
        pods = wait_for(lambda: gang_running(job_name, attempts), 240, 1,
                        f"gang {attempts} running", diagnose=lambda: diagnose(job_name))
        wait_for(lambda: newest_step(job_name) > beyond, 240, 1,
                 f"gang {attempts} checkpointing past {beyond}", diagnose=lambda: diagnose(job_name))
        return pods

    def events(job_name: str) -> list[str]:
        return [e.message for e in kube.core.list_namespaced_event(
            ns, field_selector=f"involvedObject.name={job_name}").items]

    def nothing_left(job_name: str) -> None:
        left = [p.metadata.name for p in kube.core.list_namespaced_pod(
            ns, label_selector=f"{C.LABEL_JOB}={job_name}").items
            if p.status.phase in ("Running", "Pending")]
        assert left == [], f"members of dead gangs (or a spare) still running: {left}"

    # The reference: the same gang, undisturbed (no step delay: it does not change the math).
    ref_name = submit_job(gang_job(e2e, unique("gang-ref"), e2e_bucket, "--step-delay=0"))
    assert finished(ref_name, 300)["status"]["phase"] == "Succeeded"

    if mode == "Whole":
        # --- gangRestart: Whole - every loss restarts the gang from the newest checkpoint --------
        name = submit_job(gang_job(e2e, unique("gang"), e2e_bucket))
        pods = training(name, [1, 1], 0)
        assert pods[0].spec.node_name != pods[1].spec.node_name
        assert pods[0].spec.hostname == "train-0" and pods[1].spec.subdomain == pods[0].spec.subdomain
        e2e.evict(ns, pods[1].metadata.name)                      # preemption 1, member 1
        pods = training(name, [2, 2], newest_step(name))
        lost = pods[1].spec.node_name
        lab.lose_node(lost, wait=False)                           # preemption 2, member 1's node
        done = finished(name, 600)
        assert done["status"]["phase"] == "Succeeded", diagnose(name)
        ps = phase_status(done)
        assert (ps["preemptions"], ps["failures"], ps["attempts"]) == (2, 0, 3), ps
        assert ps["lastFailure"]["pod"] == pod_name(name, "train", 2, 1), ps["lastFailure"]
        assert ps["lastFailure"]["reason"] == C.R_NODE_LOST, ps["lastFailure"]
        nothing_left(name)
        assert any("gang member 1 of 2" in m and "preempted" in m for m in events(name))

    else:
        # --- gangRestart: Member with a spare - only the lost member is replaced: by the spare,
        # state from the survivor ---------------------------------------------------------------
        # 0.3 s a step (0.15 without the spare): a spare's start and an operator's failover
        # before the first take-over take steps, and after the second loss the gang must train
        # long enough for the operator to see every rank training again (trainingAgainSeconds)
        # before it finishes
        body = gang_job(e2e, unique("gang-member"), e2e_bucket, "--step-delay=0.3")
        body["spec"]["recovery"].update(gangRestart="Member", standby=True)
        # two members and the spare on three nodes (the template's anti-affinity spreads them;
        # the lab has two spot nodes, and the on-demand one runs the CPU trainer as well)
        body["spec"]["template"]["spec"].pop("nodeSelector")
        body["spec"]["template"]["spec"]["containers"][0]["env"] += [
            {"name": "PHOENIX_HEARTBEAT_SECONDS", "value": "2"}]
        member_job = submit_job(body)

        def serving(ps: dict) -> list[str]:
            """The pod serving each member, from the status (a former spare's by its name)."""
            attempts = ps.get("members") or [ps["attempts"]] * 2
            return [f"{pod_name(member_job, 'train', a)}.spare" if m in (ps.get("spareMembers") or ())
                    else pod_name(member_job, "train", a, m) for m, a in enumerate(attempts)]

        def spare_waiting(other_than: str | None = None, ready: bool = True) -> str:
            """The spare pod (another than ``other_than``), once it is Ready (warm) and waiting
            for a place; ``ready=False``: once its container runs."""
            def found():
                sb = (phase_status(get(member_job)) or {}).get("standby") or {}
                if sb.get("reason") != "spare" or sb.get("pod") == other_than or not sb.get("node"):
                    return None
                if ready:
                    return sb["pod"] if sb.get("ready") else None
                running = kube.core.read_namespaced_pod(sb["pod"], ns).status.phase == "Running"
                return sb["pod"] if running else None
            return wait_for(found, 240, 1, "a ready spare" if ready else "a running spare",
                            diagnose=lambda: diagnose(member_job))

        def replaced(n: int) -> dict:
            """The status once the n-th replacement's gang trains again (from the heartbeats)."""
            def ready():
                ps = phase_status(get(member_job)) or {}
                rep = ps.get("lastReplacement") or {}
                return ps if ps.get("replacements") == n and rep.get("recoveredFrom") else None
            return wait_for(ready, 240, 1, f"replacement {n} training again",
                            diagnose=lambda: diagnose(member_job))

        pods = training(member_job, [1, 1], 0)
        survivor_uid = pods[0].metadata.uid
        first_spare = spare_waiting(ready=False)  # not warm yet: its successor's start is the cost
        e2e.evict(ns, first_spare)     # lost while waiting: replaced at once, nothing charged
        spare = spare_waiting(other_than=first_spare)
        ps = phase_status(get(member_job))
        assert (ps["preemptions"], ps["failures"], ps.get("replacements", 0)) == (0, 0, 0), ps
        assert any(first_spare in m and "ended before it was needed" in m
                   for m in events(member_job)), events(member_job)
        spare_pod = kube.core.read_namespaced_pod(spare, ns)
        assert spare_pod.spec.node_name not in {p.spec.node_name for p in pods}
        at_kill = newest_step(member_job)
        lab.kill_pod(ns, pods[1].metadata.name, signal.SIGKILL)   # failure 1, member 1
        leader = e2e.operators.leader()
        assert leader, e2e.operators.describe()
        lab.kill_pod(e2e.operator_namespace, leader["metadata"]["name"], signal.SIGKILL)
        ps = replaced(1)
        rep = ps["lastReplacement"]
        assert (rep["members"], rep["pods"], rep.get("spare"), rep["recoveredFrom"]) == (
            [1], [spare], spare, "peers"), rep
        assert rep["resumedStep"] >= at_kill, (rep, at_kill)  # no step lost, no emergency save
        assert ps["spareMembers"] == [1] and serving(ps) == [pods[0].metadata.name, spare], ps
        assert kube.core.read_namespaced_pod(pods[0].metadata.name, ns).metadata.uid == survivor_uid
        assert kube.core.read_namespaced_pod(spare, ns).metadata.uid == spare_pod.metadata.uid
        wait_for(lambda: newest_step(member_job) > rep["resumedStep"], 240, 1,
                 "the gang with the spare checkpointing", diagnose=lambda: diagnose(member_job))
        e2e.evict(ns, pods[0].metadata.name)  # preemption 1, member 0 (the store) leaves alone
        ps = replaced(2)  # by the next spare if it was there yet, else by a new pod
        rep = ps["lastReplacement"]
        assert rep["members"] == [0] and rep["recoveredFrom"] == "peers", ps
        assert serving(ps)[1] == spare and rep["pods"] == serving(ps)[:1], ps
        done = finished(member_job, 600)
        assert done["status"]["phase"] == "Succeeded", diagnose(member_job)
        ps = phase_status(done)
        assert (ps["preemptions"], ps["failures"], ps["replacements"]) == (1, 1, 2), ps
        assert ps["attempts"] == ps["lastReplacement"]["attempt"], ps
        assert ps["lastReplacement"]["cause"] == "preemption", ps
        wait_for(lambda: nothing_left(member_job) is None, 60, 1, "the last spare removed",
                 diagnose=lambda: diagnose(member_job))
        assert sum("MemberReplaced" == e.reason for e in kube.core.list_namespaced_event(
            ns, field_selector=f"involvedObject.name={member_job}").items) == 2

    monkeypatch.setenv("AWS_ENDPOINT_URL", e2e.s3.local_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", e2e.s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", e2e.s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    ref = f"s3://{e2e_bucket}/{ref_name}/train"
    want = gang_state(ref, tmp_path, STEPS)
    for job_name in (name if mode == "Whole" else member_job,):
        prefix = f"s3://{e2e_bucket}/{job_name}/train"
        assert checkpoint_steps(open_storage(prefix))[-1] == STEPS
        got = gang_state(prefix, tmp_path, STEPS)
        seen = [json.loads(open_storage(p).get_bytes(f"step-{STEPS:010d}/rank0-data.json"))
                for p in (prefix, ref)]
        assert seen[0] == seen[1] == {"samplesSeen": STEPS * 32, "worldSize": 4}, seen
        worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
                    for a, b in zip(got["model"].values(), want["model"].values()))
        assert tensors_equal(got, want), \
            f"{job_name}: final weights differ (largest relative difference {worst:.2e})"


def standby_gang_job(e2e, name: str, bucket: str, *extra: str, standby: bool) -> dict:
    """2 pods x 1 process; members may share nodes (the lab has two spot nodes: an active
    gang and a standby gang of two pods each must fit)."""
    body = gang_job(e2e, name, bucket, *extra)
    spec = body["spec"]
    spec["template"]["spec"].pop("affinity")
    spec["phases"] = [{"name": "train", "replicas": 2, "nprocPerNode": 1}]
    spec["recovery"]["standby"] = standby
    return body


# full: a standby gang (make test has the spare member of gangRestart: Member)
@pytest.mark.full
def test_standby_gang_takes_over_when_an_active_member_is_evicted(e2e, kube, e2e_bucket,
                                                                  submit_job, tmp_path,
                                                                  monkeypatch):
    """recovery.standby on a gang: a standby gang (hostnames of its own under the same
    Service) gets ready beside the active gang; one active member evicted -> the standby gang
    is promoted as a unit (no new pod created for the attempt) and finishes with the weights
    of an undisturbed gang, tensor for tensor."""
    if "lab" not in e2e.extra:
        pytest.skip("needs the lab's spot nodes")
    ns = e2e.namespace

    def get(job_name: str) -> dict:
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job_name)

    def finished(job_name: str, timeout: float) -> dict:
        return wait_for(lambda: (j := get(job_name)) and (j.get("status") or {}).get("phase")
                        in ("Succeeded", "Failed") and j, timeout, 2, f"{job_name} finished",
                        diagnose=lambda: diagnose(job_name))

    def diagnose(job_name: str) -> str:
        pods = kube.core.list_namespaced_pod(ns, label_selector=f"{C.LABEL_JOB}={job_name}").items
        return (f"job status: {get(job_name).get('status')}\npods: "
                f"{[(p.metadata.name, p.spec.node_name, p.status.phase) for p in pods]}\n"
                f"operator log:\n{e2e.operator_logs()}")

    ref_name = submit_job(standby_gang_job(e2e, unique("sbgang-ref"), e2e_bucket,
                                           "--step-delay=0", f"--steps={STANDBY_STEPS}",
                                           standby=False))
    assert finished(ref_name, 300)["status"]["phase"] == "Succeeded"
    name = submit_job(standby_gang_job(e2e, unique("sbgang"), e2e_bucket, "--step-delay=0.4",
                                       f"--steps={STANDBY_STEPS}", standby=True))

    def standby_ready() -> dict | None:
        sb = (phase_status(get(name)) or {}).get("standby") or {}
        return sb if sb.get("ready") else None

    sb = wait_for(standby_ready, 300, 1, "standby gang ready", diagnose=lambda: diagnose(name))
    assert (sb["attempt"], sb["members"], sb["readyMembers"]) == (2, 2, 2), sb
    active = [kube.core.read_namespaced_pod(pod_name(name, "train", 1, i), ns) for i in range(2)]
    waiting = [kube.core.read_namespaced_pod(pod_name(name, "train", 2, i), ns) for i in range(2)]
    assert [p.spec.hostname for p in active] == ["train-0", "train-1"]
    assert [p.spec.hostname for p in waiting] == ["train-2-0", "train-2-1"]
    assert {p.spec.subdomain for p in active + waiting} == {active[0].spec.subdomain}
    envs = [{e.name: e.value for e in p.spec.containers[0].env} for p in waiting]
    assert all(e["PET_MASTER_ADDR"].startswith("train-2-0.") and e["PHOENIX_ROLE"] == "standby"
               for e in envs), envs
    assert phase_status(get(name))["attempts"] == 1

    e2e.evict(ns, active[1].metadata.name)  # the whole active gang stops; the standby gang is it
    wait_for(lambda: phase_status(get(name)).get("promotions") == 1, 120, 1, "promoted",
             diagnose=lambda: diagnose(name))
    done = finished(name, 600)
    assert done["status"]["phase"] == "Succeeded", diagnose(name)
    ps = phase_status(done)
    assert (ps["preemptions"], ps["failures"], ps["attempts"]) == (1, 0, 2), ps
    assert ps["lastFailure"]["pod"] == pod_name(name, "train", 1, 1), ps["lastFailure"]
    events = [e.message for e in kube.core.list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name}").items]
    assert any("standby gang of 2 pods" in m and "takes over" in m for m in events), events

    monkeypatch.setenv("AWS_ENDPOINT_URL", e2e.s3.local_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", e2e.s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", e2e.s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    prefix, ref = (f"s3://{e2e_bucket}/{n}/train" for n in (name, ref_name))
    steps = STANDBY_STEPS
    got, want = gang_state(prefix, tmp_path, steps), gang_state(ref, tmp_path, steps)
    seen = [json.loads(open_storage(p).get_bytes(f"step-{steps:010d}/rank0-data.json"))
            for p in (prefix, ref)]
    assert seen[0] == seen[1] == {"samplesSeen": steps * 32, "worldSize": 2}, seen
    assert tensors_equal(got, want), "final weights differ from the undisturbed gang's"
