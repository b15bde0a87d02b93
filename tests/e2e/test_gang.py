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

import contextlib
import json
import signal
import time

import pytest

from kube_helpers import wait_for
from phoenix_e2e import GROUP, PLURAL, VERSION, manifests, phase_status, sample_job, unique
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


class Gangs:
    """The gang tests' view of their jobs in the e2e namespace: status, pods, checkpoints,
    events, and the final weights against a reference job's."""

    def __init__(self, e2e, kube, bucket: str) -> None:
        self.e2e, self.kube, self.bucket, self.ns = e2e, kube, bucket, e2e.namespace

    def get(self, name: str) -> dict:
        return self.kube.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def diagnose(self, name: str) -> str:
        pods = self.kube.core.list_namespaced_pod(self.ns, label_selector=f"{C.LABEL_JOB}={name}").items
        return (f"job status: {self.get(name).get('status')}\npods: "
                f"{[(p.metadata.name, p.spec.node_name, p.status.phase) for p in pods]}\n"
                f"operator log:\n{self.e2e.operator_logs()}")

    def wait(self, name: str, what, timeout: float, label: str):
        return wait_for(what, timeout, 1, label, diagnose=lambda: self.diagnose(name))

    def finished(self, name: str, timeout: float) -> dict:
        return wait_for(lambda: (j := self.get(name)) and (j.get("status") or {}).get("phase")
                        in ("Succeeded", "Failed") and j, timeout, 2, f"{name} finished",
                        diagnose=lambda: self.diagnose(name))

    def succeeded(self, name: str, timeout: float = 600) -> dict:
        """The phase's status once the job Succeeded."""
        done = self.finished(name, timeout)
        assert done["status"]["phase"] == "Succeeded", self.diagnose(name)
        return phase_status(done)

    def newest_step(self, name: str) -> int:
        return max((int(k.split("/step-")[1].split("/")[0])
                    for k in manifests(self.e2e, self.bucket, f"{name}/train/")), default=0)

    def pods(self, name: str, attempts: list[int]) -> list:
        return [self.kube.core.read_namespaced_pod(pod_name(name, "train", a, i), self.ns)
                for i, a in enumerate(attempts)]

    def training(self, name: str, attempts: list[int], beyond: int) -> list:
        """The gang (member i's pod from attempts[i]) runs and has committed a checkpoint past
        ``beyond``; returns its pods."""
        pods = self.wait(name, lambda: (ps := self.pods(name, attempts))
                         and all(p.status.phase == "Running" for p in ps) and ps,
                         240, f"gang {attempts} running")
        self.wait(name, lambda: self.newest_step(name) > beyond, 240,
                  f"gang {attempts} checkpointing past {beyond}")
        return pods

    def replaced(self, name: str, n: int) -> dict:
        """The phase's status once the n-th in-place replacement's gang trains again (from
        the heartbeats)."""
        def ready():
            ps = phase_status(self.get(name)) or {}
            rep = ps.get("lastReplacement") or {}
            return ps if ps.get("replacements") == n and rep.get("recoveredFrom") else None
        return self.wait(name, ready, 240, f"replacement {n} training again")

    def events(self, name: str) -> list:
        return self.kube.core.list_namespaced_event(
            self.ns, field_selector=f"involvedObject.name={name}").items

    def messages(self, name: str) -> list[str]:
        return [e.message for e in self.events(name)]

    @contextlib.contextmanager
    def operators_paused(self, lab, most_seconds: float = 6.0):
        """Every operator replica SIGSTOPped (as a paused VM would be) for the block, then
        SIGCONTinued: what happens meanwhile reaches the operator as one backlog, so its next
        pass sees it all at once. ``most_seconds`` keeps the pause inside the chart's renew
        deadline (10 s), so the leader keeps leading and nobody takes over."""
        ns = self.e2e.operator_namespace
        names = [p["metadata"]["name"] for p in self.e2e.operators.pods()]
        for n in names:
            lab.kill_pod(ns, n, signal.SIGSTOP)
        started = time.monotonic()
        try:
            yield most_seconds
        finally:
            for n in names:
                lab.kill_pod(ns, n, signal.SIGCONT)
        assert time.monotonic() - started < most_seconds + 2, "the pause outlasted its bound"

    def ended(self, pods: list) -> bool:
        """Every one of these pods has ended (Failed or Succeeded), as the kubelet reports."""
        return all(self.kube.core.read_namespaced_pod(p.metadata.name, self.ns).status.phase
                   in ("Failed", "Succeeded") for p in pods)

    def nothing_left(self, name: str) -> None:
        left = [p.metadata.name for p in self.kube.core.list_namespaced_pod(
            self.ns, label_selector=f"{C.LABEL_JOB}={name}").items
            if p.status.phase in ("Running", "Pending")]
        assert left == [], f"members of dead gangs (or a spare) still running: {left}"

    def same_weights(self, name: str, ref_name: str, steps: int, world: int, tmp_path,
                     monkeypatch, global_batch: int = 32) -> None:
        """The job's newest checkpoint is at ``steps``, saw exactly the reference's samples
        and holds its weights, tensor for tensor."""
        monkeypatch.setenv("AWS_ENDPOINT_URL", self.e2e.s3.local_endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", self.e2e.s3.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", self.e2e.s3.secret_key)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        prefix, ref = (f"s3://{self.bucket}/{n}/train" for n in (name, ref_name))
        assert checkpoint_steps(open_storage(prefix))[-1] == steps
        got, want = gang_state(prefix, tmp_path, steps), gang_state(ref, tmp_path, steps)
        seen = [json.loads(open_storage(p).get_bytes(f"step-{steps:010d}/rank0-data.json"))
                for p in (prefix, ref)]
        assert seen[0] == seen[1] == {"samplesSeen": steps * global_batch, "worldSize": world}, seen
        worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
                    for a, b in zip(got["model"].values(), want["model"].values()))
        assert tensors_equal(got, want), \
            f"{name}: final weights differ (largest relative difference {worst:.2e})"


# full for Whole: make test restarts a whole gang in test_hangs.py (a rank stopped before its
# collective) and runs the in-place recovery (Member, with a spare) here
@pytest.mark.parametrize("mode", [pytest.param("Whole", marks=pytest.mark.full), "Member"])
def test_gang_survives_losses_whole_and_member_by_member(e2e, kube, e2e_bucket, submit_job,
                                                        tmp_path, monkeypatch, mode):
    if "lab" not in e2e.extra:
        pytest.skip("kills a container and loses a node: needs the lab")
    lab = e2e.extra["lab"]
    ns = e2e.namespace
    g = Gangs(e2e, kube, e2e_bucket)

    # The reference: the same gang, undisturbed (no step delay: it does not change the math).
    ref_name = submit_job(gang_job(e2e, unique("gang-ref"), e2e_bucket, "--step-delay=0"))
    assert g.finished(ref_name, 300)["status"]["phase"] == "Succeeded"

    if mode == "Whole":
        # --- gangRestart: Whole - every loss restarts the gang from the newest checkpoint --------
        name = submit_job(gang_job(e2e, unique("gang"), e2e_bucket))
        pods = g.training(name, [1, 1], 0)
        assert pods[0].spec.node_name != pods[1].spec.node_name
        assert pods[0].spec.hostname == "train-0" and pods[1].spec.subdomain == pods[0].spec.subdomain
        e2e.evict(ns, pods[1].metadata.name)                      # preemption 1, member 1
        pods = g.training(name, [2, 2], g.newest_step(name))
        lost = pods[1].spec.node_name
        lab.lose_node(lost, wait=False)                           # preemption 2, member 1's node
        ps = g.succeeded(name)
        assert (ps["preemptions"], ps["failures"], ps["attempts"]) == (2, 0, 3), ps
        assert ps["lastFailure"]["pod"] == pod_name(name, "train", 2, 1), ps["lastFailure"]
        assert ps["lastFailure"]["reason"] == C.R_NODE_LOST, ps["lastFailure"]
        g.nothing_left(name)
        assert any("gang member 1 of 2" in m and "preempted" in m for m in g.messages(name))

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
                sb = (phase_status(g.get(member_job)) or {}).get("standby") or {}
                if sb.get("reason") != "spare" or sb.get("pod") == other_than or not sb.get("node"):
                    return None
                if ready:
                    return sb["pod"] if sb.get("ready") else None
                running = kube.core.read_namespaced_pod(sb["pod"], ns).status.phase == "Running"
                return sb["pod"] if running else None
            return g.wait(member_job, found, 240, "a ready spare" if ready else "a running spare")

        pods = g.training(member_job, [1, 1], 0)
        survivor_uid = pods[0].metadata.uid
        first_spare = spare_waiting(ready=False)  # not warm yet: its successor's start is the cost
        e2e.evict(ns, first_spare)     # lost while waiting: replaced at once, nothing charged
        spare = spare_waiting(other_than=first_spare)
        ps = phase_status(g.get(member_job))
        assert (ps["preemptions"], ps["failures"], ps.get("replacements", 0)) == (0, 0, 0), ps
        assert any(first_spare in m and "ended before it was needed" in m
                   for m in g.messages(member_job)), g.messages(member_job)
        spare_pod = kube.core.read_namespaced_pod(spare, ns)
        assert spare_pod.spec.node_name not in {p.spec.node_name for p in pods}
        at_kill = g.newest_step(member_job)
        lab.kill_pod(ns, pods[1].metadata.name, signal.SIGKILL)   # failure 1, member 1
        leader = e2e.operators.leader()
        assert leader, e2e.operators.describe()
        lab.kill_pod(e2e.operator_namespace, leader["metadata"]["name"], signal.SIGKILL)
        ps = g.replaced(member_job, 1)
        rep = ps["lastReplacement"]
        assert (rep["members"], rep["pods"], rep.get("spare"), rep["recoveredFrom"]) == (
            [1], [spare], spare, "peers"), rep
        assert rep["resumedStep"] >= at_kill, (rep, at_kill)  # no step lost, no emergency save
        assert ps["spareMembers"] == [1] and serving(ps) == [pods[0].metadata.name, spare], ps
        assert kube.core.read_namespaced_pod(pods[0].metadata.name, ns).metadata.uid == survivor_uid
        assert kube.core.read_namespaced_pod(spare, ns).metadata.uid == spare_pod.metadata.uid
        g.wait(member_job, lambda: g.newest_step(member_job) > rep["resumedStep"], 240,
               "the gang with the spare checkpointing")
        e2e.evict(ns, pods[0].metadata.name)  # preemption 1, member 0 (the store) leaves alone
        ps = g.replaced(member_job, 2)  # by the next spare if it was there yet, else by a new pod
        rep = ps["lastReplacement"]
        assert rep["members"] == [0] and rep["recoveredFrom"] == "peers", ps
        assert serving(ps)[1] == spare and rep["pods"] == serving(ps)[:1], ps
        ps = g.succeeded(member_job)
        assert (ps["preemptions"], ps["failures"], ps["replacements"]) == (1, 1, 2), ps
        assert ps["attempts"] == ps["lastReplacement"]["attempt"], ps
        assert ps["lastReplacement"]["cause"] == "preemption", ps
        g.wait(member_job, lambda: g.nothing_left(member_job) is None, 60, "the last spare removed")
        assert sum("MemberReplaced" == e.reason for e in g.events(member_job)) == 2

    g.same_weights(name if mode == "Whole" else member_job, ref_name, STEPS, 4, tmp_path,
                   monkeypatch)


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
    g = Gangs(e2e, kube, e2e_bucket)

    ref_name = submit_job(standby_gang_job(e2e, unique("sbgang-ref"), e2e_bucket,
                                           "--step-delay=0", f"--steps={STANDBY_STEPS}",
                                           standby=False))
    assert g.finished(ref_name, 300)["status"]["phase"] == "Succeeded"
    name = submit_job(standby_gang_job(e2e, unique("sbgang"), e2e_bucket, "--step-delay=0.4",
                                       f"--steps={STANDBY_STEPS}", standby=True))

    def standby_ready() -> dict | None:
        sb = (phase_status(g.get(name)) or {}).get("standby") or {}
        return sb if sb.get("ready") else None

    sb = g.wait(name, standby_ready, 300, "standby gang ready")
    assert (sb["attempt"], sb["members"], sb["readyMembers"]) == (2, 2, 2), sb
    active = [kube.core.read_namespaced_pod(pod_name(name, "train", 1, i), ns) for i in range(2)]
    waiting = [kube.core.read_namespaced_pod(pod_name(name, "train", 2, i), ns) for i in range(2)]
    assert [p.spec.hostname for p in active] == ["train-0", "train-1"]
    assert [p.spec.hostname for p in waiting] == ["train-2-0", "train-2-1"]
    assert {p.spec.subdomain for p in active + waiting} == {active[0].spec.subdomain}
    envs = [{e.name: e.value for e in p.spec.containers[0].env} for p in waiting]
    assert all(e["PET_MASTER_ADDR"].startswith("train-2-0.") and e["PHOENIX_ROLE"] == "standby"
               for e in envs), envs
    assert phase_status(g.get(name))["attempts"] == 1

    e2e.evict(ns, active[1].metadata.name)  # the whole active gang stops; the standby gang is it
    g.wait(name, lambda: phase_status(g.get(name)).get("promotions") == 1, 120, "promoted")
    ps = g.succeeded(name)
    assert (ps["preemptions"], ps["failures"], ps["attempts"]) == (1, 0, 2), ps
    assert ps["lastFailure"]["pod"] == pod_name(name, "train", 1, 1), ps["lastFailure"]
    events = g.messages(name)
    assert any("standby gang of 2 pods" in m and "takes over" in m for m in events), events

    g.same_weights(name, ref_name, STANDBY_STEPS, 2, tmp_path, monkeypatch)


# full: three members, two of them lost in one pass and one lost while another joins (make test
# has the two-member in-place gang above; decide/members' unit tests hold each case's rule)
@pytest.mark.full
def test_member_gang_of_three_loses_two_together_and_one_while_another_joins(
        e2e, kube, e2e_bucket, submit_job, tmp_path, monkeypatch):
    """``gangRestart: Member``, 3 pods x 1 process, one per lab node, no spare. Members 1 and
    2 SIGKILLed together while the operator replicas are paused, so the operator's next pass
    sees both lost at once: one fence replaces both, and the survivor hands both newcomers
    its state. Then member 0 (the store's host) evicted and, as soon as its newcomer's pod
    exists, member 1 evicted too: the lone survivor, member 2, serves both.
    The job Succeeds with every loss counted once and replaced from peers, nothing of a dead
    attempt left running, and the reference's weights."""
    if "lab" not in e2e.extra:
        pytest.skip("kills containers on the lab's nodes")
    lab = e2e.extra["lab"]
    ns = e2e.namespace
    g = Gangs(e2e, kube, e2e_bucket)

    def three(name: str, *extra: str) -> dict:
        body = gang_job(e2e, name, e2e_bucket, "--global-batch=48", "--samples=480", *extra)
        spec = body["spec"]
        spec["template"]["spec"].pop("nodeSelector")  # one member on each of the three nodes
        spec["phases"] = [{"name": "train", "replicas": 3, "nprocPerNode": 1}]
        spec["recovery"].update(gangRestart="Member", maxFailures=3)
        spec["template"]["spec"]["containers"][0]["env"] += [
            {"name": "PHOENIX_HEARTBEAT_SECONDS", "value": "2"}]
        return body

    ref_name = submit_job(three(unique("gang3-ref"), "--step-delay=0"))
    assert g.finished(ref_name, 300)["status"]["phase"] == "Succeeded", g.diagnose(ref_name)
    name = submit_job(three(unique("gang3"), "--step-delay=0.25"))
    pods = g.training(name, [1, 1, 1], 0)
    assert len({p.spec.node_name for p in pods}) == 3

    # Two members lost together: the operator paused while both die, so its next pass sees
    # both at once (one fence replaces both).
    with g.operators_paused(lab) as most:
        for p in pods[1:]:
            lab.kill_pod(ns, p.metadata.name, signal.SIGKILL)
        wait_for(lambda: g.ended(pods[1:]), most, 0.2, "members 1 and 2 reported ended")

    def both_replaced() -> dict | None:
        st = phase_status(g.get(name))
        m = st.get("members") or [1, 1, 1]
        training = (st.get("lastReplacement") or {}).get("recoveredFrom")
        return st if training and m[1] > 1 and m[2] > 1 else None

    ps = g.wait(name, both_replaced, 240, "members 1 and 2 replaced and training again")
    assert (ps["failures"], ps["replacements"]) == (1, 1), ps  # one loss of two members
    assert ps["lastReplacement"]["members"] == [1, 2], ps
    assert ps["members"] == [1, 2, 2] and ps["lastReplacement"]["recoveredFrom"] == "peers", ps
    before = ps["replacements"]

    g.wait(name, lambda: g.newest_step(name) > ps["lastReplacement"]["resumedStep"], 240,
           "the gang checkpointing again")
    members = ps["members"]
    e2e.evict(ns, pod_name(name, "train", members[0], 0))  # the store's host
    joining = g.wait(name, lambda: (st := phase_status(g.get(name))).get("replacements") == before + 1
                     and st, 120, "member 0's newcomer created")
    newcomer = pod_name(name, "train", joining["members"][0], 0)
    g.wait(name, lambda: any(p.metadata.name == newcomer for p in kube.core.list_namespaced_pod(
        ns, label_selector=f"{C.LABEL_JOB}={name}").items), 60, f"{newcomer} created")
    e2e.evict(ns, pod_name(name, "train", members[1], 1))  # while member 0's newcomer joins
    ps = g.succeeded(name)
    assert ps["preemptions"] == 2 and ps["replacements"] == before + 2, ps
    rep = ps["lastReplacement"]
    assert rep["members"] == [1] and rep["recoveredFrom"] == "peers", rep
    assert ps["members"][2] == members[2], ps  # member 2 kept its pod throughout
    g.wait(name, lambda: g.nothing_left(name) is None, 60, "every pod ended")
    assert sum(e.reason == "MemberReplaced" for e in g.events(name)) == ps["replacements"]
    g.same_weights(name, ref_name, STEPS, 3, tmp_path, monkeypatch, global_batch=48)
