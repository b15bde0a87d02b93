"""In-place gang recovery (``recovery.gangRestart: Member``, decide/members.py): only the
lost members get new pods, the survivors keep theirs, the fence names who serves each
member, the loss is charged once, and an operator that stops between the status and the
pods creates exactly the missing members' pods."""
from __future__ import annotations

import pytest

from phoenix_operator import constants as C
from phoenix_operator.decide import decide
from phoenix_operator.podspec import gang_service

from opfacts import at, job, listing, phase_status, pod, with_status
from phoenix_operator.podspec import pod_name

NO_CK = {"train": listing()}

pytestmark = pytest.mark.unit


def member_job(replicas=3, **recovery):
    body = job(recovery={"maxFailures": 2, "gangRestart": "Member",
                         "backoff": {"initialSeconds": 10, "maxSeconds": 60}, **recovery})
    body["spec"]["phases"][0]["replicas"] = replicas
    body["spec"]["phases"][0]["nprocPerNode"] = 2
    return body


def member(i, attempt=1, node="spot-1", in_place=True, **kw):
    p = pod(attempt=attempt, node=node, **kw)
    if in_place:
        p["spec"]["containers"][0]["env"] = [{"name": "PHOENIX_GANG_RESTART", "value": "Member"}]
    name = pod_name("j", "train", attempt, i)
    p["metadata"].update(name=name, uid=f"uid-{name}", creationTimestamp="2026-01-01T11:59:00Z")
    p["metadata"]["labels"][C.LABEL_MEMBER] = str(i)
    return p


def ps(plan):
    return plan.status["phases"][0]


def env(create) -> dict:
    return {e["name"]: e.get("value") for e in create.manifest["spec"]["containers"][0]["env"]}


RUN1 = phase_status(pod="j.train-1.0", podUID="uid-j.train-1.0")
SVC = gang_service("j", "train")


def store(member_, attempt):
    return f"train-{member_}.{SVC}.ns.svc:{29500 + attempt}"


def test_a_member_mode_gang_runs_torchrun_standalone_with_phoenix_s_group():
    plan = decide(member_job(), [], NO_CK, at(0))
    assert [c.name for c in plan.create] == ["j.train-1.0", "j.train-1.1", "j.train-1.2"]
    for i, c in enumerate(plan.create):
        e = env(c)
        assert (e["PET_STANDALONE"], e["PET_NNODES"], e["PET_NPROC_PER_NODE"]) == ("1", "1", "2")
        assert "PET_NODE_RANK" not in e and "PET_MASTER_ADDR" not in e
        assert (e["PHOENIX_GANG_RESTART"], e["PHOENIX_GANG_MEMBERS"], e["PHOENIX_GANG_MEMBER"]) \
            == ("Member", "3", str(i))
        assert e["PHOENIX_GANG_STORE"] == store(0, 1) and e["PHOENIX_GANG_STORE_MEMBER"] == "0"
        spec = c.manifest["spec"]
        assert {"name": "phoenix-peer", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
        assert {"name": "phoenix-peer", "mountPath": e["PHOENIX_PEER_DIR"]} in \
            spec["containers"][0]["volumeMounts"]
        assert c.gang.members == ("j.train-1.0", "j.train-1.1", "j.train-1.2")
        assert (c.gang.store, c.gang.store_member) == (store(0, 1), 0)


def test_a_whole_mode_gang_keeps_torchrun_s_multi_node_rendezvous():
    body = member_job()
    body["spec"]["recovery"]["gangRestart"] = "Whole"
    plan = decide(body, [], NO_CK, at(0))
    e = env(plan.create[0])
    assert e["PET_NNODES"] == "3" and "PHOENIX_GANG_RESTART" not in e
    assert plan.create[0].gang is None and "volumes" not in plan.create[0].manifest["spec"]


def test_a_lost_member_is_replaced_alone_and_the_survivors_keep_their_pods():
    body = with_status(member_job(), RUN1)
    evicted = member(1, pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                     finished=at(-5))
    plan = decide(body, [member(0), evicted, member(2)], NO_CK, at(1))
    st = ps(plan)
    assert [c.name for c in plan.create] == ["j.train-2.1"]
    assert [d.name for d in plan.delete] == []  # the survivors are not touched
    assert (st["state"], st["attempts"], st["members"]) == ("Running", 2, [1, 2, 1])
    assert (st["preemptions"], st["failures"], st["replacements"]) == (1, 0, 1)
    assert st["lastFailure"]["pod"] == "j.train-1.1" and st["pod"] == "j.train-1.0"
    rep = st["lastReplacement"]
    assert (rep["members"], rep["lostPods"], rep["pods"], rep["cause"]) == (
        [1], ["j.train-1.1"], ["j.train-2.1"], "preemption")
    new = plan.create[0]
    assert new.gang.members == ("j.train-1.0", "j.train-2.1", "j.train-1.2")
    assert (new.gang.store, new.gang.store_member) == (store(0, 2), 0)
    assert env(new)["PHOENIX_ATTEMPT"] == "2" and env(new)["PHOENIX_GANG_STORE"] == store(0, 2)
    assert new.previous_cause == "preemption"
    assert [e.reason for e in plan.events] == ["Preempted", C.EV_MEMBER_REPLACED]
    assert [r.cause for r in plan.recoveries] == ["preemption"]

    # the next pass, with the new pod: live, nothing more to do; its uid is recorded
    body["status"] = plan.status
    pods = [member(0), evicted, member(2), member(1, attempt=2)]
    again = decide(body, pods, NO_CK, at(2))
    assert again.create == [] and again.delete == [] and ps(again)["state"] == "Running"
    assert ps(again)["podUID"] == "uid-j.train-1.0" and ps(again)["members"] == [1, 2, 1]


def test_losing_the_store_host_moves_the_store_to_the_lowest_survivor():
    body = with_status(member_job(), RUN1)
    killed = member(0, pod_phase="Failed", exit_code=137, reason="Error", finished=at(-5))
    plan = decide(body, [killed, member(1), member(2)], NO_CK, at(1))
    assert [c.name for c in plan.create] == ["j.train-2.0"]
    new = plan.create[0]
    assert (new.gang.store, new.gang.store_member) == (store(1, 2), 1)
    assert env(new)["PHOENIX_GANG_STORE_MEMBER"] == "1"
    assert ps(plan)["pod"] == "j.train-2.0" and ps(plan)["members"] == [2, 1, 1]


def test_two_members_lost_at_once_are_one_loss_and_both_replaced():
    body = with_status(member_job(), RUN1)
    gone = [member(i, pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                   finished=at(-5)) for i in (1, 2)]
    plan = decide(body, [member(0), *gone], NO_CK, at(1))
    assert [c.name for c in plan.create] == ["j.train-2.1", "j.train-2.2"]
    assert ps(plan)["preemptions"] == 1 and ps(plan)["members"] == [1, 2, 2]
    assert {c.gang for c in plan.create} == {plan.create[0].gang}  # one fence for both


def test_a_member_lost_while_a_newcomer_still_joins_is_replaced_in_turn():
    body = with_status(member_job(), RUN1)
    evicted = member(1, pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                     finished=at(-5))
    first = decide(body, [member(0), evicted, member(2)], NO_CK, at(1))
    body["status"] = first.status
    joining = member(1, attempt=2, pod_phase="Pending", node="spot-2")
    lost2 = member(2, pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                   finished=at(3))
    plan = decide(body, [member(0), evicted, lost2, joining], NO_CK, at(4))
    assert [c.name for c in plan.create] == ["j.train-3.2"]
    st = ps(plan)
    assert (st["attempts"], st["members"], st["preemptions"]) == (3, [1, 2, 3], 2)
    # the newcomer still starting is carried into attempt 3 by name
    assert plan.create[0].gang.members == ("j.train-1.0", "j.train-2.1", "j.train-3.2")


def test_the_operator_stopping_between_status_and_pods_creates_only_the_missing_member():
    body = with_status(member_job(), RUN1)
    evicted = member(1, pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                     finished=at(-5))
    plan = decide(body, [member(0), evicted, member(2)], NO_CK, at(1))
    body["status"] = plan.status  # the status was written; the pod never was
    again = decide(body, [member(0), evicted, member(2)], NO_CK, at(30))
    assert [c.name for c in again.create] == ["j.train-2.1"]
    assert again.create[0].gang == plan.create[0].gang
    st = ps(again)
    assert (st["attempts"], st["preemptions"], st["replacements"]) == (2, 1, 1)
    assert [e.reason for e in again.events] == ["PodCreated"]


def test_a_gang_with_no_survivor_or_a_finished_member_restarts_whole():
    body = with_status(member_job(), RUN1)
    dead = [member(i, pod_phase="Failed", exit_code=1, message="bug", finished=at(-5))
            for i in range(3)]
    plan = decide(body, dead, NO_CK, at(1))
    assert ps(plan)["state"] == "Recovering" and plan.create == []
    done = member(0, pod_phase="Succeeded", exit_code=0)
    failed = member(1, pod_phase="Failed", exit_code=1, message="bug", finished=at(-5))
    plan = decide(body, [done, failed, member(2)], NO_CK, at(1))
    assert ps(plan)["state"] == "Recovering" and [d.name for d in plan.delete] == ["j.train-1.2"]


def test_an_exhausted_budget_fails_the_phase_and_stops_the_survivors():
    body = with_status(member_job(), phase_status(pod="j.train-1.0", podUID="uid-j.train-1.0",
                                                  failures=2))
    failed = member(1, pod_phase="Failed", exit_code=1, message="bug", finished=at(-5))
    plan = decide(body, [member(0), failed, member(2)], NO_CK, at(1))
    assert ps(plan)["state"] == "Failed" and plan.create == []
    assert {d.name for d in plan.delete} == {"j.train-1.0", "j.train-1.2"}


def test_a_whole_restart_after_in_place_replacements_clears_the_member_map():
    body = with_status(member_job(), phase_status(
        attempts=2, pod="j.train-1.0", podUID="uid-j.train-1.0", members=[1, 2, 1],
        state="Recovering"))
    plan = decide(body, [], NO_CK, at(100))
    assert [c.name for c in plan.create] == ["j.train-3.0", "j.train-3.1", "j.train-3.2"]
    assert "members" not in ps(plan)


def test_survivors_not_started_to_rejoin_restart_whole():
    body = with_status(member_job(), RUN1)
    evicted = member(1, pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                     finished=at(-5))
    plan = decide(body, [member(0, in_place=False), evicted, member(2)], NO_CK, at(1))
    assert ps(plan)["state"] == "Recovering" and plan.create == []
    assert {d.name for d in plan.delete} == {"j.train-1.0", "j.train-1.2"}


def test_the_replacement_s_outcome_comes_from_the_new_attempt_s_heartbeats():
    from phoenix_operator.decide import PhaseProgress, RankProgress
    body = with_status(member_job(), RUN1)
    evicted = member(1, pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                     finished=at(-5))
    body["status"] = decide(body, [member(0), evicted, member(2)], NO_CK, at(1)).status
    pods = [member(0), evicted, member(2), member(1, attempt=2)]

    def beats(*since):
        return {"train": PhaseProgress(2, tuple(
            RankProgress(rank=r, pod="p", step=300, activity="training", stalled=0.1,
                         restored_from="peers", restored_step=212, training_since=t)
            for r, t in enumerate(since)))}
    t0 = at(-5).timestamp()
    early = decide(body, pods, NO_CK, at(10), progress=beats(t0 + 6, None, t0 + 7, t0 + 8,
                                                             t0 + 6, t0 + 6))
    assert "recoveredFrom" not in ps(early)["lastReplacement"]  # a rank has not trained yet
    plan = decide(body, pods, NO_CK, at(12), progress=beats(*(t0 + x for x in (6, 9.5, 7, 8, 6, 6))))
    rep = ps(plan)["lastReplacement"]
    assert (rep["recoveredFrom"], rep["resumedStep"], rep["trainingAgainSeconds"]) == ("peers", 212, 9.5)


def _slow_ranks(attempt=1):
    from phoenix_operator.decide import PhaseProgress, RankProgress
    ranks = []
    for m in range(3):
        for local in range(2):
            r = m * 2 + local
            ranks.append(RankProgress(
                rank=r, pod=pod_name("j", "train", attempt, m), step=100, activity="training",
                stalled=0.2, step_p50=0.5, step_p95=0.6, steps_timed=40, node=f"n{m}",
                compute_p50=0.45 if r == 3 else 0.1))
    return {"train": PhaseProgress(attempt, tuple(ranks))}


def test_a_straggler_s_member_is_moved_off_its_node_without_a_preemption():
    body = with_status(member_job(onStraggler="Replace"), RUN1)
    pods = [member(i, node=f"n{i}") for i in range(3)]
    plan = decide(body, pods, NO_CK, at(100), progress=_slow_ranks())
    st = ps(plan)
    assert [(d.name, d.reason) for d in plan.delete] == [("j.train-1.1", "StragglerMoved")]
    move = st["lastMove"]
    assert (move["member"], move["rank"], move["pod"], move["node"]) == (1, 3, "j.train-1.1", "n1")
    assert "StragglerMoved" in [e.reason for e in plan.events] and st["preemptions"] == 0
    # a second pass while the pod stops: no second move
    body["status"] = plan.status
    again = decide(body, pods, NO_CK, at(110), progress=_slow_ranks())
    assert [d.name for d in again.delete] in ([], ["j.train-1.1"])
    assert "StragglerMoved" not in [e.reason for e in again.events]
    # the member left (exit 143): replaced in place, kept off n1, not charged
    left = member(1, node="n1", pod_phase="Failed", exit_code=143, term_reason="preempted",
                  finished=at(115))
    plan = decide(body, [pods[0], left, pods[2]], NO_CK, at(116))
    st = ps(plan)
    assert [c.name for c in plan.create] == ["j.train-2.1"]
    assert (st["preemptions"], st["failures"], st["stragglerMoves"]) == (0, 0, 1), st
    assert st["lastReplacement"]["cause"] == "move" and plan.create[0].previous_end is None
    terms = plan.create[0].manifest["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert any("n1" in e.get("values", ()) for t in terms for e in t["matchFields"]), terms
    assert plan.recoveries == []


def test_straggler_moves_are_bounded_and_need_member_mode():
    body = with_status(member_job(onStraggler="Replace"), phase_status(
        pod="j.train-1.0", podUID="uid-j.train-1.0", stragglerMoves=3))
    pods = [member(i, node=f"n{i}") for i in range(3)]
    assert decide(body, pods, NO_CK, at(100), progress=_slow_ranks()).delete == []
    whole = with_status(member_job(onStraggler="Replace", gangRestart="Whole"), RUN1)
    assert decide(whole, pods, NO_CK, at(100), progress=_slow_ranks()).delete == []


def test_a_newcomer_not_yet_scheduled_gets_the_whole_schedule_timeout():
    """The survivors were created long ago: the timeout counts from the newcomer's creation."""
    body = with_status(member_job(gangScheduleTimeoutSeconds=60), phase_status(
        attempts=2, pod="j.train-1.0", podUID="uid-j.train-1.0", members=[1, 2, 1]))
    newcomer = member(1, attempt=2, node=None, pod_phase="Pending")
    newcomer["metadata"]["creationTimestamp"] = "2026-01-01T12:00:00Z"
    pods = [member(0), newcomer, member(2)]
    early = decide(body, pods, NO_CK, at(30))
    assert early.delete == [] and early.requeue_after == 30
    late = decide(body, pods, NO_CK, at(61))
    assert {d.name for d in late.delete} == {"j.train-1.0", "j.train-2.1", "j.train-1.2"}
