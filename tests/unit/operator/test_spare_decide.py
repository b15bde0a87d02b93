"""An in-place gang's spare member (``recovery.standby`` with ``gangRestart: Member``,
decide/standby.py and decide/members.py): one pod, off the members' nodes, started once the
gang trains; it takes the first lost member's place (the fence names it, no new pod), a new
spare follows; a spare lost while waiting is replaced without charging the gang; one that a
member came to share a node with is moved; an operator that stops between the take-over's
fence and its status names the same attempt again."""
from __future__ import annotations

import pytest

from phoenix_operator import constants as C
from phoenix_operator import history, history_log, timeline
from phoenix_operator.decide import AttemptEnd, Listing, decide
from phoenix_operator.podspec import gang_service, pod_name
from phoenix_trainer.core.handshake import Fence

from opfacts import at, job, listing, phase_status, pod, with_status

pytestmark = pytest.mark.unit

NO_CK = {"train": listing()}
SVC = gang_service("j", "train")
SPARE2 = "j.train-2.spare"


def spare_job(replicas=3, **recovery):
    body = job(recovery={"maxFailures": 2, "gangRestart": "Member", "standby": True,
                         "backoff": {"initialSeconds": 10, "maxSeconds": 60}, **recovery})
    body["spec"]["phases"][0]["replicas"] = replicas
    return body


def ready(p):
    p["status"]["conditions"].append({"type": "Ready", "status": "True"})
    return p


def member(i, attempt=1, node=None, is_ready=True, **kw):
    p = pod(attempt=attempt, node=node or f"n{i}", **kw)
    p["spec"]["containers"][0]["env"] = [{"name": "PHOENIX_GANG_RESTART", "value": "Member"}]
    name = pod_name("j", "train", attempt, i)
    p["metadata"].update(name=name, uid=f"uid-{name}")
    p["metadata"]["labels"][C.LABEL_MEMBER] = str(i)
    return ready(p) if is_ready and kw.get("pod_phase", "Running") == "Running" else p


def spare_pod(attempt=2, node="n9", is_ready=True, **kw):
    """The pod ``build_pod(spare=True)`` makes, as the API returns it."""
    p = pod(attempt=attempt, node=node, **kw)
    p["spec"]["containers"][0]["env"] = [{"name": "PHOENIX_GANG_RESTART", "value": "Member"}]
    name = f"{pod_name('j', 'train', attempt)}.spare"
    p["metadata"].update(name=name, uid=f"uid-{name}")
    p["metadata"]["labels"].update({C.LABEL_STANDBY: "true", C.LABEL_SPARE: "true"})
    return ready(p) if is_ready and kw.get("pod_phase", "Running") == "Running" else p


def ps(plan):
    return plan.status["phases"][0]


def env(manifest) -> dict:
    return {e["name"]: e.get("value") for e in manifest["spec"]["containers"][0]["env"]}


def required_off(manifest) -> set[str]:
    terms = manifest["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return {v for t in terms for e in t["matchFields"] for v in e["values"]}


RUN1 = phase_status(pod="j.train-1.0", podUID="uid-j.train-1.0")
WITH_SPARE = phase_status(pod="j.train-1.0", podUID="uid-j.train-1.0", lastAttempt=2,
                          standby={"pod": SPARE2, "attempt": 2, "reason": "spare",
                                   "since": "2026-01-01T11:59:00Z", "podUID": f"uid-{SPARE2}",
                                   "node": "n9", "ready": True})
EVICTED = dict(pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
               finished=at(-5))


def test_a_training_member_gang_gets_one_spare_pod_off_every_member_s_node():
    body = with_status(spare_job(), RUN1)
    plan = decide(body, [member(i) for i in range(3)], NO_CK, at(0))
    assert [c.name for c in plan.create] == [SPARE2]  # one pod, not a standby gang of 3
    spare = plan.create[0]
    assert spare.standby and spare.gang is None  # no fence moves for it
    labels = spare.manifest["metadata"]["labels"]
    assert labels[C.LABEL_SPARE] == labels[C.LABEL_STANDBY] == "true"
    assert C.LABEL_MEMBER not in labels
    e = env(spare.manifest)
    assert e["PHOENIX_ROLE"] == "spare" and e["PHOENIX_GANG_RESTART"] == "Member"
    assert e["PHOENIX_GANG_MEMBERS"] == "3" and e["PHOENIX_ATTEMPT"] == "2"
    assert "PHOENIX_GANG_MEMBER" not in e and "PHOENIX_GANG_STORE" not in e
    assert e["PET_STANDALONE"] == "1" and "PHOENIX_STATUS_PORT" in e
    assert required_off(spare.manifest) == {"n0", "n1", "n2"}
    s = spare.manifest["spec"]
    assert (s["hostname"], s["subdomain"]) == ("train-2-spare", SVC)
    assert any(v["name"] == "phoenix-peer" for v in s["volumes"])
    sb = ps(plan)["standby"]
    assert (sb["pod"], sb["attempt"], sb["reason"]) == (SPARE2, 2, "spare")
    assert [e.reason for e in plan.events] == [C.EV_STANDBY_STARTED]


def test_no_spare_while_the_gang_has_not_trained_yet():
    body = with_status(spare_job(), RUN1)
    pods = [member(0), member(1, is_ready=False), member(2)]
    assert decide(body, pods, NO_CK, at(0)).create == []


def test_a_lost_member_s_place_goes_to_the_spare_and_no_pod_is_created():
    body = with_status(spare_job(), WITH_SPARE)
    lost = member(1, **EVICTED)
    pods = [member(0), lost, member(2), spare_pod()]
    plan = decide(body, pods, NO_CK, at(1))
    st = ps(plan)
    assert plan.create == [] and plan.delete == []
    assert (st["attempts"], st["members"], st["spareMembers"]) == (3, [1, 2, 1], [1])
    assert (st["preemptions"], st["replacements"]) == (1, 1) and "standby" not in st
    rep = st["lastReplacement"]
    assert (rep["members"], rep["lostPods"], rep["pods"], rep["spare"]) == (
        [1], ["j.train-1.1"], [SPARE2], SPARE2)
    [promote] = plan.promote  # the fence, written before the status, moves the gang
    assert (promote.attempt, promote.pod) == (3, SPARE2)
    assert promote.gang.members == ("j.train-1.0", SPARE2, "j.train-1.2")
    assert (promote.gang.store, promote.gang.store_member) == (
        f"train-0.{SVC}.ns.svc:{29500 + 3}", 0)
    assert promote.previous_cause == "preemption"
    assert [e.reason for e in plan.events] == ["Preempted", C.EV_MEMBER_REPLACED]
    assert "spare pod j.train-2.spare (ready) took member 1's place" in plan.events[-1].message

    # next pass: the former spare serves member 1 (nothing to create or delete), and no new
    # spare competes with the take-over until every rank trains again (heartbeats) ...
    body["status"] = plan.status
    again = decide(body, pods, NO_CK, at(2))
    assert again.create == [] and again.delete == [] and ps(again)["state"] == "Running"
    assert ps(again)["podUID"] == "uid-j.train-1.0" and ps(again)["spareMembers"] == [1]
    body["status"] = again.status
    trained = decide(body, pods, NO_CK, at(4), progress=beats(3, at(3)))
    assert trained.create == [] and ps(trained)["lastReplacement"]["trainingAgainSeconds"] == 8
    # ... then a new spare is started, off every member's node (n9 included)
    body["status"] = trained.status
    last = decide(body, pods, NO_CK, at(5), progress=beats(3, at(3)))
    assert [c.name for c in last.create] == ["j.train-4.spare"]
    assert required_off(last.create[0].manifest) == {"n0", "n9", "n2"}


def beats(attempt, since, ranks=3):
    from phoenix_operator.decide import PhaseProgress, RankProgress
    return {"train": PhaseProgress(attempt, tuple(
        RankProgress(rank=r, pod="p", step=50, activity="training", stalled=0.1,
                     restored_from="peers", restored_step=40, training_since=since.timestamp())
        for r in range(ranks)))}


def test_two_lost_with_one_spare_the_spare_takes_one_and_a_new_pod_the_other():
    body = with_status(spare_job(), WITH_SPARE)
    pods = [member(0), member(1, **EVICTED), member(2, **EVICTED), spare_pod()]
    plan = decide(body, pods, NO_CK, at(1))
    st = ps(plan)
    assert [c.name for c in plan.create] == ["j.train-3.2"] and plan.promote == []
    assert plan.create[0].gang.members == ("j.train-1.0", SPARE2, "j.train-3.2")
    assert (st["members"], st["spareMembers"], st["preemptions"]) == ([1, 2, 3], [1], 1)
    rep = st["lastReplacement"]
    assert (rep["members"], rep["pods"], rep["spare"]) == ([1, 2], [SPARE2, "j.train-3.2"], SPARE2)

    # the operator stopped after the status: only the missing new pod is created again
    body["status"] = plan.status
    again = decide(body, pods, NO_CK, at(30))
    assert [c.name for c in again.create] == ["j.train-3.2"]
    assert again.create[0].gang == plan.create[0].gang


def test_the_operator_stopping_between_the_take_over_s_fence_and_status_names_it_again():
    body = with_status(spare_job(), WITH_SPARE)
    pods = [member(0), member(1, **EVICTED), member(2), spare_pod()]
    first = decide(body, pods, NO_CK, at(1)).promote[0]
    # the fence was written; the status (still attempt 1, the spare waiting) was not
    own = Fence(3, SPARE2, uid="u-1", job="ns/j", members=first.gang.members,
                store=first.gang.store, store_member=0)
    plan = decide(body, pods, {"train": Listing((), fence=own)}, at(5))
    assert [(p.attempt, p.gang) for p in plan.promote] == [(3, first.gang)]
    assert (ps(plan)["attempts"], ps(plan)["preemptions"]) == (3, 1)
    # a fence of ours for another gang is only a floor
    other = Fence(3, "x", uid="u-1", members=("j.train-1.0", "j.train-3.1", "j.train-1.2"))
    plan = decide(body, pods, {"train": Listing((), fence=other)}, at(5))
    assert plan.promote[0].attempt == 4


def test_a_spare_lost_while_waiting_is_replaced_without_charging_the_gang():
    body = with_status(spare_job(), WITH_SPARE)
    gone = spare_pod(**EVICTED)
    plan = decide(body, [member(i) for i in range(3)] + [gone], NO_CK, at(1))
    st = ps(plan)
    assert (st["preemptions"], st["failures"], st.get("replacements", 0)) == (0, 0, 0)
    assert [c.name for c in plan.create] == ["j.train-3.spare"]  # at once: not its fault
    assert st["standby"]["pod"] == "j.train-3.spare"
    assert [e.reason for e in plan.events] == [C.EV_STANDBY_LOST, C.EV_STANDBY_STARTED]

    failed = spare_pod(pod_phase="Failed", exit_code=1, message="bug", finished=at(-5))
    plan = decide(body, [member(i) for i in range(3)] + [failed], NO_CK, at(1))
    st = ps(plan)
    assert plan.create == [] and st["standbyFailures"] == 1 and st["failures"] == 0
    assert "standbyRetryAt" in st  # a failing spare backs off (invariant 3)


def test_a_spare_on_the_lost_member_s_node_is_not_used():
    body = with_status(spare_job(), WITH_SPARE)
    pods = [member(0), member(1, node="n9", **EVICTED), member(2), spare_pod(node="n9")]
    plan = decide(body, pods, NO_CK, at(1))
    assert [c.name for c in plan.create] == ["j.train-3.1"] and plan.promote == []
    assert "spare" not in ps(plan)["lastReplacement"]


def test_a_spare_not_scheduled_yet_is_kept_and_a_new_pod_takes_the_place():
    body = with_status(spare_job(), WITH_SPARE)
    pending = spare_pod(node=None, pod_phase="Pending", is_ready=False)
    pods = [member(0), member(1, **EVICTED), member(2), pending]
    plan = decide(body, pods, NO_CK, at(1))
    assert [c.name for c in plan.create] == ["j.train-3.1"] and plan.delete == []
    assert ps(plan)["standby"]["pod"] == SPARE2


def test_a_spare_passed_over_by_a_replacement_is_still_removed_with_the_phase():
    body = with_status(spare_job(), WITH_SPARE)
    pending = spare_pod(node=None, pod_phase="Pending", is_ready=False)
    pods = [member(0), member(1, **EVICTED), member(2), pending]
    body["status"] = decide(body, pods, NO_CK, at(1)).status
    assert ps(decide(body, pods, NO_CK, at(2)))["attempts"] == 3  # past the spare's 2
    done = [member(0, pod_phase="Succeeded", exit_code=0), member(1, **EVICTED),
            member(1, attempt=3, pod_phase="Succeeded", exit_code=0),
            member(2, pod_phase="Succeeded", exit_code=0), pending]
    plan = decide(body, done, NO_CK, at(60))
    assert ps(plan)["state"] == "Succeeded" and [d.name for d in plan.delete] == [SPARE2]


def test_a_passed_over_spare_that_ended_has_its_pod_object_collected_once_another_ended():
    """Like a standby's (``_collect_ended_standbys``): the newest ended spare's pod is kept
    for its logs, older ones are deleted; a spare numbered below the active attempt (a
    replacement passed it while it was Pending) is no exception."""
    body = with_status(spare_job(), WITH_SPARE)
    pending = spare_pod(node=None, pod_phase="Pending", is_ready=False)
    pods = [member(0), member(1, **EVICTED), member(2), pending]
    body["status"] = decide(body, pods, NO_CK, at(1)).status
    st = body["status"]["phases"][0]
    assert st["attempts"] == 3 and st["standby"]["pod"] == SPARE2, st
    # the replaced gang trains again (what the heartbeats tell: test_members_decide.py)
    st["lastReplacement"].update(recoveredFrom="checkpoint", resumedStep=0,
                                 trainingAgainSeconds=5.0)
    gang = [member(0), member(1, **EVICTED), member(1, attempt=3), member(2)]
    gone = spare_pod(**EVICTED)  # the passed-over spare, preempted while waiting
    plan = decide(body, gang + [gone], NO_CK, at(2))
    assert [c.name for c in plan.create] == ["j.train-4.spare"] and plan.delete == []
    body["status"] = plan.status
    failed = spare_pod(attempt=4, pod_phase="Failed", exit_code=1, message="bug",
                       finished=at(-1))  # the next one ended too: the older one goes
    plan = decide(body, gang + [gone, failed], NO_CK, at(3))
    assert [d.name for d in plan.delete] == [SPARE2], plan.delete


def test_a_spare_whose_node_a_member_s_pod_came_to_share_is_moved_off_it():
    body = with_status(spare_job(), phase_status(
        attempts=3, pod="j.train-1.0", podUID="uid-j.train-1.0", members=[1, 3, 1],
        lastAttempt=2, standby=WITH_SPARE["standby"]))
    pods = [member(0), member(1, attempt=3, node="n9"), member(2), spare_pod()]
    plan = decide(body, pods, NO_CK, at(1))
    assert [d.name for d in plan.delete] == [SPARE2]
    assert [c.name for c in plan.create] == ["j.train-4.spare"]
    assert required_off(plan.create[0].manifest) == {"n0", "n9", "n2"}
    assert "member 1's pod now runs on its node n9" in plan.events[0].message
    assert ps(plan)["preemptions"] == 0


def test_a_former_spare_lost_later_is_replaced_by_a_new_pod_and_may_host_the_store():
    body = with_status(spare_job(), WITH_SPARE)
    pods = [member(0, **EVICTED), member(1), member(2), spare_pod()]
    taken = decide(body, pods, NO_CK, at(1))
    assert taken.promote[0].gang.members == (SPARE2, "j.train-1.1", "j.train-1.2")
    assert ps(taken)["pod"] == SPARE2  # member 0's pod
    body["status"] = taken.status
    # member 1 lost next: the store goes to member 0, which the former spare serves
    pods = [member(0, **EVICTED), member(1, **EVICTED), member(2), spare_pod()]
    plan = decide(body, pods, NO_CK, at(20))
    [new] = plan.create
    assert new.name == "j.train-4.1"
    assert new.gang.store == f"train-2-spare.{SVC}.ns.svc:{29500 + 4}"
    assert env(new.manifest)["PHOENIX_GANG_STORE"] == new.gang.store
    body["status"] = plan.status
    # then the former spare itself: a new pod for member 0, named as the member's own
    pods = [member(0, **EVICTED), member(1, attempt=4), member(2),
            spare_pod(pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                      finished=at(25))]
    plan = decide(body, pods, NO_CK, at(30))
    assert [c.name for c in plan.create] == ["j.train-5.0"]
    st = ps(plan)
    assert st["lastReplacement"]["lostPods"] == [SPARE2] and "spareMembers" not in st
    assert plan.create[0].gang.members == ("j.train-5.0", "j.train-4.1", "j.train-1.2")


def test_a_gang_restarting_whole_removes_its_spare():
    body = with_status(spare_job(), WITH_SPARE)
    dead = [member(i, pod_phase="Failed", exit_code=1, message="bug", finished=at(-5))
            for i in range(3)]
    plan = decide(body, dead + [spare_pod()], NO_CK, at(1))
    assert ps(plan)["state"] == "Recovering" and SPARE2 in [d.name for d in plan.delete]
    assert "standby" not in ps(plan)


def test_a_whole_mode_gang_keeps_its_standby_gang():
    body = with_status(spare_job(gangRestart="Whole"), RUN1)
    pods = [member(i) for i in range(3)]
    for p in pods:
        p["spec"]["containers"][0]["env"] = []
    plan = decide(body, pods, NO_CK, at(0))
    assert [c.name for c in plan.create] == ["j.train-2.0", "j.train-2.1", "j.train-2.2"]
    assert ps(plan)["standby"]["reason"] == "standby"


def test_a_spare_taking_a_place_is_recorded_as_the_spare_not_as_a_promoted_standby():
    body = with_status(spare_job(), WITH_SPARE)
    plan = decide(body, [member(0), member(1, **EVICTED), member(2), spare_pod()], NO_CK, at(1))
    by = {"replica": "r", "term": 1, "lease": "l"}
    waiting = history.standby_record("train", 2, SPARE2, time=at(-60), by=by)
    [start] = history_log.start_records(plan, time=at(1), by=by)
    assert (start["kind"], start["attempt"], start["pod"]) == ("start", 3, SPARE2)
    assert (start["promoted"], start["spare"]) == (False, True), start
    ended = history.end_record(AttemptEnd(phase="train", attempt=1, cause="preemption",
                                          reason="Evicted", ended=at(-5), pod="j.train-1.1",
                                          members=3), by=by, gpus=0)
    records = [history.start_record("train", 1, "j.train-1.0", resume_from=None, promoted=False,
                                    time=at(-120), by=by, members=3), waiting, ended, start]
    [row] = history.disruptions(records, "train")
    assert (row["promoted"], row["spare"], row["next"]) == (False, True, 3), row
    lanes = timeline.build(records, now=at(30))
    assert lanes[0].standbys == [(at(-60), at(1))]  # the spare's wait ends at the take-over
    text = timeline.render_text("j", lanes, now=at(30))
    assert "the spare took the place" in text and "was the standby" not in text, text
