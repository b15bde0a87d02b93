"""Standbys and preemption notices, decided pass after pass on a small simulated world: the
plan's status is written back, its pods created or deleted, its fence and control writes
recorded. Injected clock; no cluster, no storage."""
from __future__ import annotations

import copy
from datetime import timedelta

import pytest

from phoenix_operator import constants as C
from phoenix_operator.node_health import NodeHealth
from phoenix_operator.outcomes import classify
from phoenix_operator.decide import decide
from phoenix_operator.podspec import pod_name

from phoenix_trainer.core.contract import ENV_STATUS_PORT as C_ENV_STATUS_PORT

from opfacts import T0, at, job, listing, pod

pytestmark = pytest.mark.unit

NOTICE = NodeHealth(notice="taint karpenter.sh/disrupted")
CK = {"train": listing(10, 20)}
CK20 = "s3://bucket/run/train/step-00000020"


class World:
    """The job, its pods and what was written to storage, moved along by ``decide``."""

    def __init__(self, **recovery):
        self.body = job(recovery={"maxFailures": 2, **recovery})
        self.pods: dict[str, dict] = {}
        self.nodes: dict[str, NodeHealth] = {}
        self.fences: list[tuple[int, str | None]] = []
        self.controls: list = []
        self.events: list[str] = []
        self.now = T0
        self.plan = None

    def step(self, seconds: float = 1.0):
        self.now += timedelta(seconds=seconds)
        plan = decide(self.body, list(self.pods.values()), {}, self.now, self.nodes)
        if plan.needs_checkpoints:
            plan = decide(self.body, list(self.pods.values()), CK, self.now, self.nodes)
        self.plan = plan
        for p in plan.promote:
            self.fences.append((p.attempt, p.resume_from))
        self.controls += [c.control for c in plan.control]
        for c in plan.create:
            if not c.standby:
                self.fences.append((c.attempt, c.resume_from))
            m = copy.deepcopy(c.manifest)
            m["metadata"]["uid"] = f"uid-{c.name}"
            m["status"] = {"phase": "Pending", "conditions": []}
            self.pods[c.name] = m
        for d in plan.delete:
            self.pods.pop(d.name, None)
        self.body["status"] = plan.status
        self.events += [e.reason for e in plan.events]
        return plan

    def run(self, name: str, node: str, ready: bool = False) -> None:
        p = self.pods[name]
        p["spec"]["nodeName"] = node
        p["status"] = {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}

    def end(self, name: str, exit_code: int, term_reason: str | None = None, **kw) -> None:
        attempt = int(self.pods[name]["metadata"]["labels"][C.LABEL_ATTEMPT])
        ended = pod(attempt=attempt, pod_phase="Failed" if exit_code else "Succeeded",
                    exit_code=exit_code, term_reason=term_reason, finished=self.now, **kw)
        ended["metadata"]["labels"] = self.pods[name]["metadata"]["labels"]
        ended["spec"] = self.pods[name]["spec"]
        self.pods[name] = ended

    @property
    def phase(self) -> dict:
        return self.body["status"]["phases"][0]


def env(manifest) -> dict:
    return {e["name"]: e.get("value") for e in manifest["spec"]["containers"][0]["env"]}


def avoided(manifest) -> list[str]:
    terms = manifest["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return [v for t in terms for f in t.get("matchFields", ()) for v in f["values"]]


def disfavoured(manifest) -> list[str]:
    prefs = manifest["spec"]["affinity"]["nodeAffinity"].get(
        "preferredDuringSchedulingIgnoredDuringExecution", [])
    return [v for p in prefs for f in p["preference"]["matchFields"] for v in f["values"]]


def started(w: World, node: str = "spot-1", ready: bool = True) -> str:
    """Run the job's first attempt on ``node`` (``ready``: restored, training)."""
    w.step()
    active = pod_name("j", "train", 1)
    w.run(active, node, ready=ready)
    w.step()
    return active


def with_ready_standby() -> tuple[World, str, str]:
    """A job with recovery.standby: attempt 1 running on spot-1, its standby ready on spot-2."""
    w = World(standby=True)
    active = started(w)
    standby = w.plan.create[0].name
    w.run(standby, "spot-2", ready=True)
    w.step()
    return w, active, standby


def test_a_kept_standby_waits_until_the_active_attempt_trains_and_probes_it():
    w = World(standby=True)
    active = started(w, ready=False)  # running, still importing / restoring
    assert w.plan.create == [] and w.phase.get("standby") is None
    probe = w.pods[active]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"] == {"path": "/ready", "port": C.STATUS_PORT}
    # not before the interpreter has imported torch: earlier, every start left "Unhealthy" events
    assert probe["initialDelaySeconds"] == C.STATUS_PROBE_DELAY_SECONDS > 0
    assert env(w.pods[active])[C_ENV_STATUS_PORT] == str(C.STATUS_PORT)
    w.run(active, "spot-1", ready=True)
    w.step()
    assert [c.name for c in w.plan.create] == [pod_name("j", "train", 2)]


def test_a_notice_does_not_wait_for_the_active_attempt_to_be_ready():
    w = World(standby=True)
    active = started(w, ready=False)
    w.nodes["spot-1"] = NOTICE
    w.step()
    assert [c.name for c in w.plan.create] == [pod_name("j", "train", 2)]
    assert w.phase["standby"]["reason"] == "notice"
    assert active in w.pods


def test_without_a_kept_standby_the_active_pod_has_no_probe():
    w = World()
    active = started(w)
    container = w.pods[active]["spec"]["containers"][0]
    assert "readinessProbe" not in container and C_ENV_STATUS_PORT not in env(w.pods[active])


def test_standby_is_started_off_the_active_node_and_waits_unfenced():
    w = World(standby=True)
    started(w)
    sb = w.plan.create
    assert [c.name for c in sb] == [pod_name("j", "train", 2)] and sb[0].standby
    m = sb[0].manifest
    assert env(m)["PHOENIX_ROLE"] == "standby" and "PHOENIX_RESUME_FROM" not in env(m)
    assert m["metadata"]["labels"][C.LABEL_STANDBY] == "true"
    assert m["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == C.STATUS_PORT
    assert avoided(m) == ["spot-1"]
    assert w.fences == [(1, CK20)]  # the standby's creation moved nothing
    assert w.phase["standby"]["attempt"] == 2 and w.phase["attempts"] == 1
    assert C.EV_STANDBY_STARTED in w.events
    w.run(sb[0].name, "spot-2", ready=True)
    w.step()
    assert w.phase["standby"]["ready"] is True and w.phase["standby"]["node"] == "spot-2"
    assert w.events.count(C.EV_STANDBY_READY) == 1
    quiet = w.step()  # a fixed point: nothing more to do
    assert not quiet.create and not quiet.events and not quiet.promote


@pytest.mark.parametrize("how", ["evicted", "sigkill-node-lost", "deleted"])
def test_standby_takes_over_when_the_active_attempt_ends(how):
    w, active, standby = with_ready_standby()
    if how == "evicted":
        w.end(active, 143, term_reason="preempted", disruption="EvictionByEvictionAPI")
    elif how == "sigkill-node-lost":
        w.end(active, 137)
        w.nodes["spot-1"] = NodeHealth(missing=True)
    else:
        del w.pods[active]
    plan = w.step()
    assert [(p.attempt, p.pod, p.resume_from) for p in plan.promote] == \
        [(2, standby, CK20)]
    assert w.fences[-1] == (2, CK20)
    assert not [c for c in plan.create if not c.standby]  # no new pod: the standby is it
    st = w.phase
    assert (st["state"], st["attempts"], st["pod"], st["preemptions"], st["promotions"]) == \
        ("Running", 2, standby, 1, 1)
    assert "standby" not in st and C.EV_PROMOTED in w.events
    plan = w.step()  # a new standby, off the new active's node
    assert [c.name for c in plan.create] == [pod_name("j", "train", 3)]
    assert avoided(plan.create[0].manifest) == ["spot-2"]


def test_notice_checkpoints_now_starts_a_standby_and_hands_off_once_it_is_ready():
    w = World()  # onNotice defaults to Handoff; no standby kept otherwise
    active = started(w)
    assert not w.plan.create
    w.nodes["spot-1"] = NOTICE
    plan = w.step()
    assert [e for e in w.events if e in (C.EV_NOTICE, C.EV_STANDBY_STARTED)] == \
        [C.EV_NOTICE, C.EV_STANDBY_STARTED]
    (ctl,) = w.controls
    assert (ctl.attempt, ctl.handoff_to) == (1, None) and "karpenter.sh/disrupted" in ctl.checkpoint_now
    (sb,) = plan.create
    assert sb.standby and avoided(sb.manifest) == ["spot-1"] == disfavoured(sb.manifest)
    assert w.phase["notices"] == 1 and w.phase["lastNotice"]["node"] == "spot-1"
    assert w.phase["standby"]["reason"] == "notice"
    w.step()
    assert len(w.controls) == 1  # the same notice is not acted on twice
    w.run(sb.name, "spot-2", ready=True)
    w.step()
    ctl = w.controls[-1]
    assert (ctl.attempt, ctl.handoff_to, ctl.handoff_pod) == (1, 2, sb.name)
    assert ctl.checkpoint_now == w.controls[0].checkpoint_now  # no second checkpoint asked
    assert w.phase["lastNotice"]["handoffTo"] == 2 and C.EV_HANDOFF in w.events
    w.step()
    assert len(w.controls) == 2 and w.fences == [(1, CK20)]  # nothing moves until it ends
    # The trainer checkpoints, fences for attempt 2 itself and exits as preempted (nothing
    # but the node's notice and the operator's own request corroborate it).
    w.end(active, 143, term_reason="preempted")
    plan = w.step()
    assert [p.attempt for p in plan.promote] == [2]
    assert (w.phase["attempts"], w.phase["preemptions"], w.phase["promotions"]) == (2, 1, 1)
    plan = w.step()
    assert not plan.create  # no recovery.standby: no new standby after a notice's handoff


def test_handoff_the_operator_asked_for_is_no_failure_when_the_notice_is_gone():
    """The trainer's "preempted" alone is a failure (a probe's SIGTERM says the same), but an
    exit after the operator's own handoff request is corroborated by that request, even when
    the node's notice was lifted meanwhile."""
    w = World()
    active = started(w)
    w.nodes["spot-1"] = NOTICE
    (sb,) = w.step().create
    w.run(sb.name, "spot-2", ready=True)
    w.step()
    assert w.controls[-1].handoff_to == 2
    w.nodes["spot-1"] = NodeHealth()  # the taint is lifted before the trainer exits
    w.end(active, 143, term_reason="preempted")
    plan = w.step()
    assert [p.attempt for p in plan.promote] == [2]
    assert (w.phase["failures"], w.phase["preemptions"]) == (0, 1)
    assert w.phase["lastFailure"]["reason"] == C.R_HANDOFF


def test_notice_with_onNotice_Checkpoint_only_asks_for_a_checkpoint():
    w = World(onNotice="Checkpoint")
    started(w)
    w.nodes["spot-1"] = NOTICE
    plan = w.step()
    assert len(w.controls) == 1 and w.controls[0].handoff_to is None
    assert not plan.create and "standby" not in w.phase


def test_notice_is_ignored_with_onNotice_Ignore():
    w = World(onNotice="Ignore")
    started(w)
    w.nodes["spot-1"] = NOTICE
    plan = w.step()
    assert not w.controls and not plan.create and "notices" not in w.phase


def test_a_standby_whose_node_announces_reclaim_is_replaced():
    w = World(standby=True)
    started(w)
    first = w.plan.create[0].name
    w.run(first, "spot-2", ready=True)
    w.step()
    w.nodes["spot-2"] = NOTICE
    plan = w.step()
    assert [d.name for d in plan.delete] == [first] and C.EV_STANDBY_LOST in w.events
    (again,) = plan.create  # in the same pass
    assert again.name == pod_name("j", "train", 3)
    # Off the active's node for sure; off the reclaimed one while its taint keeps it off
    # (it may come back fresh under the same name).
    assert avoided(again.manifest) == ["spot-1"] and disfavoured(again.manifest) == ["spot-2"]


def test_a_failed_standby_is_retried_after_a_pause_and_never_adopted():
    w = World(standby=True)
    started(w)
    first = w.plan.create[0].name
    w.run(first, "spot-2")
    w.step()
    w.end(first, 1, term_reason="failed")
    plan = w.step()
    assert C.EV_STANDBY_LOST in w.events and "standby" not in w.phase and not plan.create
    assert plan.requeue_after is not None and plan.requeue_after <= 30
    assert w.phase["attempts"] == 1 and w.phase["state"] == "Running"  # not adopted
    plan = w.step(31)
    assert [c.name for c in plan.create] == [pod_name("j", "train", 3)]


@pytest.mark.parametrize("end", ["completed", "suspended"])
def test_standby_is_removed_when_the_phase_ends_or_the_job_is_suspended(end):
    w, active, standby = with_ready_standby()
    if end == "completed":
        w.end(active, 0)
    else:
        w.body["spec"]["suspend"] = True
    plan = w.step()
    assert standby in [d.name for d in plan.delete]
    assert "standby" not in w.phase


def test_recovering_without_a_standby_skips_the_numbers_standbys_used():
    w = World(standby=True)
    active = started(w)
    standby = w.plan.create[0].name
    w.run(standby, "spot-2")
    w.step()
    w.end(standby, 1, term_reason="failed")  # the standby fails ...
    w.step()
    w.end(active, 143, term_reason="preempted", disruption="EvictionByEvictionAPI")  # ... then the active is preempted
    plan = w.step()
    (new,) = [c for c in plan.create if not c.standby]
    assert new.attempt == 3 and w.fences[-1] == (3, CK20)


def test_a_kill_on_a_node_that_announced_its_reclaim_is_a_preemption():
    p = pod(pod_phase="Failed", exit_code=137, node="spot-1")
    assert classify(p, {"spot-1": NOTICE}, at(1)).cause.value == "preemption"
    assert classify(p, {"spot-1": NodeHealth()}, at(1)).cause.value == "failure"


# --- standby gangs ---------------------------------------------------------------------

def gang_world(**recovery) -> World:
    w = World(**recovery)
    w.body["spec"]["phases"] = [{"name": "train", "replicas": 2}]
    return w


def gang_started(w: World, nodes=("spot-1", "spot-2"), ready=(True, True)) -> list[str]:
    w.step()
    active = [pod_name("j", "train", 1, i) for i in range(2)]
    for name, node, r in zip(active, nodes, ready):
        w.run(name, node, ready=r)
    w.step()
    return active


def test_a_standby_gang_waits_until_every_active_member_trains():
    w = gang_world(standby=True)
    active = gang_started(w, ready=(True, False))
    assert w.plan.create == []
    w.run(active[1], "spot-2", ready=True)
    w.step()
    assert [c.name for c in w.plan.create] == [pod_name("j", "train", 2, i) for i in range(2)]


def gang_with_ready_standby() -> tuple[World, list[str], list[str]]:
    w = gang_world(standby=True)
    active = gang_started(w)
    standby = [c.name for c in w.plan.create]
    for name, node in zip(standby, ("spot-3", "spot-4")):
        w.run(name, node, ready=True)
    w.step()
    return w, active, standby


def test_a_standby_gang_is_created_together_with_hostnames_of_its_own():
    w = gang_world(standby=True)
    active = gang_started(w)
    sb = w.plan.create
    assert [c.name for c in sb] == [pod_name("j", "train", 2, i) for i in range(2)]
    assert all(c.standby for c in sb) and set(w.fences) == {(1, CK20)}  # nothing fenced for it
    hosts = [w.pods[n]["spec"]["hostname"] for n in active]
    assert hosts == ["train-0", "train-1"]
    assert [c.manifest["spec"]["hostname"] for c in sb] == ["train-2-0", "train-2-1"]
    assert len({c.manifest["spec"]["subdomain"] for c in sb} |
               {w.pods[n]["spec"]["subdomain"] for n in active}) == 1  # one Service
    for i, c in enumerate(sb):
        e = env(c.manifest)
        assert e["PHOENIX_ROLE"] == "standby" and "PHOENIX_RESUME_FROM" not in e
        assert e["PET_NODE_RANK"] == str(i) and e["PET_NNODES"] == "2"
        assert e["PET_MASTER_ADDR"].startswith("train-2-0.")
        assert e["PHOENIX_ATTEMPT"] == "2"
        assert c.manifest["metadata"]["labels"][C.LABEL_STANDBY] == "true"
        assert c.manifest["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == \
            C.STATUS_PORT
        # No notice: nothing required, the active gang's nodes only disfavoured.
        assert "requiredDuringSchedulingIgnoredDuringExecution" not in \
            c.manifest["spec"]["affinity"]["nodeAffinity"]
        assert disfavoured(c.manifest) == ["spot-1", "spot-2"]
        # The API server takes one value per matchFields requirement on metadata.name.
        prefs = c.manifest["spec"]["affinity"]["nodeAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"]
        assert all(len(f["values"]) == 1 for p in prefs for f in p["preference"]["matchFields"])
    assert env(w.pods[active[0]])["PET_MASTER_ADDR"].startswith("train-0.")
    assert w.plan.services  # the Service is ensured with the standby gang
    st = w.phase["standby"]
    assert (st["pod"], st["attempt"], st["members"], st["readyMembers"], st["ready"]) == \
        (sb[0].name, 2, 2, 0, False)


def test_a_standby_gang_is_ready_only_when_every_member_is():
    w = gang_world(standby=True)
    gang_started(w)
    sb = [c.name for c in w.plan.create]
    w.run(sb[0], "spot-3", ready=True)
    w.run(sb[1], "spot-4", ready=False)
    w.step()
    assert (w.phase["standby"]["ready"], w.phase["standby"]["readyMembers"]) == (False, 1)
    assert C.EV_STANDBY_READY not in w.events
    w.run(sb[1], "spot-4", ready=True)
    w.step()
    assert (w.phase["standby"]["ready"], w.phase["standby"]["readyMembers"]) == (True, 2)
    assert w.events.count(C.EV_STANDBY_READY) == 1
    quiet = w.step()
    assert not quiet.create and not quiet.events and not quiet.promote and not quiet.delete


def test_a_standby_gang_takes_over_as_a_unit_when_an_active_member_is_evicted():
    w, active, standby = gang_with_ready_standby()
    w.end(active[1], 143, term_reason="preempted", disruption="EvictionByEvictionAPI")
    plan = w.step()
    assert [(p.attempt, p.pod, p.resume_from) for p in plan.promote] == [(2, standby[0], CK20)]
    assert active[0] in [d.name for d in plan.delete]  # the rest of the old gang goes
    assert not [c for c in plan.create if not c.standby]
    st = w.phase
    assert (st["state"], st["attempts"], st["pod"], st["preemptions"], st["promotions"]) == \
        ("Running", 2, standby[0], 1, 1)
    w.pods.pop(active[0], None)
    plan = w.step()  # a new standby gang, numbered past the promoted one
    assert [c.name for c in plan.create] == [pod_name("j", "train", 3, i) for i in range(2)]
    assert [c.manifest["spec"]["hostname"] for c in plan.create] == ["train-3-0", "train-3-1"]
    assert disfavoured(plan.create[0].manifest) == ["spot-3", "spot-4"]
    assert [f for f in w.fences if f[0] == 2] == [(2, CK20)]  # one write for the whole gang


def test_a_standby_gang_that_loses_a_member_is_deleted_and_replaced_after_the_pause():
    w, active, standby = gang_with_ready_standby()
    w.end(standby[1], 1, term_reason="failed")
    plan = w.step()
    assert [d.name for d in plan.delete] == [standby[0]] and C.EV_STANDBY_LOST in w.events
    assert "standby" not in w.phase and not plan.create and w.phase["attempts"] == 1
    w.pods.pop(standby[0], None)
    plan = w.step(31)
    assert [c.name for c in plan.create] == [pod_name("j", "train", 3, i) for i in range(2)]


def test_a_standby_gang_not_all_scheduled_in_time_is_released_then_tried_again():
    w = gang_world(standby=True, gangScheduleTimeoutSeconds=60)
    gang_started(w)
    sb = [c.name for c in w.plan.create]
    for name in sb:
        w.pods[name]["metadata"]["creationTimestamp"] = w.now.strftime("%Y-%m-%dT%H:%M:%SZ")
    w.run(sb[0], "spot-3")
    w.step(30)
    assert not w.plan.delete and w.phase["standby"]["attempt"] == 2
    plan = w.step(31)
    assert sorted(d.name for d in plan.delete) == sorted(sb)
    assert "standby" not in w.phase and w.phase["standbyRetryAt"]
    for name in sb:
        w.pods.pop(name, None)
    assert not w.step(30).create
    plan = w.step(31)
    assert [c.attempt for c in plan.create] == [3, 3] and "standbyRetryAt" not in w.phase


def test_a_gang_member_s_notice_checkpoints_and_hands_off_to_a_standby_gang():
    w = gang_world()  # onNotice Handoff, no standby kept otherwise
    active = gang_started(w)
    assert not w.plan.create
    w.nodes["spot-2"] = NOTICE
    plan = w.step()
    assert [(c.attempt, c.handoff_to) for c in w.controls] == [(1, None)]
    assert w.phase["lastNotice"]["node"] == "spot-2"
    sb = [c.name for c in plan.create]
    assert sb == [pod_name("j", "train", 2, i) for i in range(2)]
    for c in plan.create:  # off the noticed node for sure, off the other by preference
        assert avoided(c.manifest) == ["spot-2"]
        assert disfavoured(c.manifest) == ["spot-1", "spot-2"]
    w.run(sb[0], "spot-3", ready=True)
    w.run(sb[1], "spot-4", ready=False)
    w.step()
    assert len(w.controls) == 1  # not all ready: no handoff yet
    w.run(sb[1], "spot-4", ready=True)
    w.step()
    ctl = w.controls[-1]
    assert (ctl.attempt, ctl.handoff_to, ctl.handoff_pod) == (1, 2, sb[0])
    # Every rank saved at the same step; rank 0 fenced for attempt 2; all exit preempted.
    for name in active:
        w.end(name, 143, term_reason="preempted", disruption="EvictionByEvictionAPI")
    plan = w.step()
    assert [p.attempt for p in plan.promote] == [2] and w.phase["attempts"] == 2


def test_a_promoted_standby_gang_s_missing_member_is_created_as_a_standby():
    """Operator stopped after the standby gang's status, before all its pods: promoted
    anyway, the missing member is created with the standby gang's hostnames."""
    w, active, standby = gang_with_ready_standby()
    del w.pods[standby[1]]
    w.phase["standby"].pop("podUID")
    w.end(active[0], 143, term_reason="preempted", disruption="EvictionByEvictionAPI")
    plan = w.step()
    assert [p.attempt for p in plan.promote] == [2]
    w.pods.pop(active[1], None)
    plan = w.step()
    (again,) = [c for c in plan.create if c.attempt == 2]
    assert again.name == standby[1] and again.manifest["spec"]["hostname"] == "train-2-1"


# --- issue 22, item 5: only a standby that can run is promoted --------------------------------
@pytest.mark.parametrize("where", ["pending", "node-not-ready", "node-noticed"])
def test_a_standby_that_cannot_run_is_not_promoted_a_fresh_attempt_starts(where):
    """A Pending standby (no capacity, still pinned off the old node) or one on a NotReady
    node was promoted when the active pod ended, and the phase stranded there."""
    w = World(standby=True)
    active = started(w)
    standby = w.plan.create[0].name
    if where == "pending":
        pass  # never scheduled
    else:
        w.run(standby, "spot-2", ready=True)
        w.nodes["spot-2"] = NodeHealth(not_ready_since=w.now) if where == "node-not-ready" \
            else NOTICE
    w.step()
    w.end(active, 143, disruption="EvictionByEvictionAPI")
    plan = w.step()
    assert plan.promote == [], plan.promote
    assert standby in [d.name for d in plan.delete] or standby not in w.pods
    fresh = [c for c in plan.create if not c.standby]
    standbys = [int(p["metadata"]["labels"][C.LABEL_ATTEMPT]) for p in w.pods.values()
                if p["metadata"]["labels"].get(C.LABEL_STANDBY)]
    assert len(fresh) == 1 and fresh[0].attempt > max(standbys + [2]), plan.create
    assert "affinity" not in fresh[0].manifest["spec"]  # not pinned off any node
    assert C.EV_STANDBY_LOST in w.events


def test_a_bound_standby_on_a_ready_node_is_promoted():
    w, active, standby = with_ready_standby()
    w.end(active, 143, disruption="EvictionByEvictionAPI")
    plan = w.step()
    assert [p.attempt for p in plan.promote] == [2]


# --- issue 22, item 4: a failing standby is retried with backoff, up to a cap ----------------
def test_a_standby_that_keeps_failing_backs_off_then_stops_with_a_condition():
    """A standby whose template fails (say, a bad arg only the standby path hits) was created
    again every 30 s for ever: 40 GPU pods in 20 minutes, every one kept and re-read."""
    from datetime import datetime

    w = World(standby=True)
    started(w)
    delays = []
    for _ in range(C.MAX_STANDBY_FAILURES):
        sb = w.phase["standby"]["pod"]
        w.run(sb, "spot-2")
        w.step()
        w.end(sb, 1, term_reason="failed")
        w.step()
        assert "standby" not in w.phase
        retry = w.phase.get("standbyRetryAt")
        if retry is None:
            break
        delays.append((datetime.fromisoformat(retry.replace("Z", "+00:00")) - w.now).total_seconds())
        w.step(delays[-1] - 1)
        assert not [c for c in w.plan.create if c.standby]  # not before the backoff is over
        w.step(1)
        assert [c for c in w.plan.create if c.standby]
    assert len(delays) == C.MAX_STANDBY_FAILURES - 1 and delays == sorted(delays) \
        and delays[-1] > delays[0], delays
    w.step(3600)
    assert not [c for c in w.plan.create if c.standby] and "standby" not in w.phase
    cond = next(c for c in w.body["status"]["conditions"] if c["type"] == C.COND_STANDBY_FAILING)
    assert cond["status"] == "True" and "train" in cond["message"]
    assert C.EV_STANDBY_GIVEN_UP in w.events
    # Ended standby pods are not kept piling up: the newest failed one stays, for its logs.
    ended = [n for n, p in w.pods.items() if p["metadata"]["labels"].get(C.LABEL_STANDBY)]
    assert len(ended) <= 1, ended


# --- issue 22, item 6: notices that are withdrawn, and notices that are only advice ----------
def test_a_withdrawn_notice_takes_its_standby_away():
    """Without recovery.standby, a notice's standby sat idle on a GPU for ever once the
    notice was lifted (no handoff had been asked yet)."""
    w = World()
    started(w)
    w.nodes["spot-1"] = NOTICE
    (sb,) = w.step().create
    w.run(sb.name, "spot-2")  # not ready yet: no handoff asked
    w.step()
    w.nodes["spot-1"] = NodeHealth()  # the notice is withdrawn
    plan = w.step()
    assert sb.name in [d.name for d in plan.delete] and "standby" not in w.phase
    w.step()
    assert not plan.create and not w.plan.create


def test_a_rebalance_recommendation_asks_for_a_checkpoint_not_a_handoff():
    """AWS's rebalance recommendation is advice that a reclaim may come: full handoffs on it
    each counted against maxPreemptions."""
    w = World()
    started(w)
    w.nodes["spot-1"] = NodeHealth(notice="taint aws-node-termination-handler/rebalance-recommendation")
    plan = w.step()
    assert not plan.create and "standby" not in w.phase
    (ctl,) = w.controls
    assert ctl.checkpoint_now and ctl.handoff_to is None
