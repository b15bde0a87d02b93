"""The image pull in the start-up figures: the kubelet's ``Pulled`` message parsed (the shapes
kubelet 1.35 prints, ``pkg/kubelet/images/image_manager.go``), which pods' events a pass reads,
the figure recorded in ``status.phases[].imagePull`` by ``decide``, kept in the attempt's
``end`` history record, shown by ``phoenixctl status``, and read by ``Gather`` with one
field-selected LIST per pod that just started."""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from phoenix_operator import history, image_pull
from phoenix_operator.config import OperatorConfig
from phoenix_operator.decide import AttemptEnd, decide
from phoenix_operator.gather import Gather, Tombstones
from phoenix_operator.image_pull import go_duration, parse_pulled
from phoenix_operator.kubectl_phoenix import image_pull_line
from phoenix_operator.phoenixjob import ImagePull, PhaseStatus, ts
from phoenix_operator.podspec import pod_name

from opfacts import at, job, listing, phase_status, pod, with_status

pytestmark = pytest.mark.unit

POD1 = pod_name("j", "train", 1)

IMG = "127.0.0.1:40123/phoenix-trainer:41f1c228616c"
# What the lab's kubelet (v1.35.8) posted for a cold pull and for a pod on a warm node.
PULLED = (f'Successfully pulled image "{IMG}" in 1m41.238s (1m41.238s including waiting). '
          "Image size: 6204532418 bytes.")
PULLED_QUEUED = (f'Successfully pulled image "{IMG}" in 850ms (12.401207311s including '
                 "waiting). Image size: 6204532418 bytes.")
PRESENT = 'Container image "phoenix-trainer:41f1c228616c" already present on machine'
PRESENT_NEWER = (f'Container image "{IMG}" already present on machine and can be accessed by '
                 "the pod")


@pytest.mark.parametrize("text,seconds", [
    ("1m41.238s", 101.238), ("850ms", 0.85), ("12.401207311s", 12.401207311), ("0s", 0.0),
    ("1h2m3s", 3723.0), ("250µs", 0.00025), ("0", 0.0), ("", None), ("12 s", None),
    ("3x", None)])
def test_go_duration(text, seconds):
    got = go_duration(text)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


def test_a_cold_pull_gives_seconds_waiting_and_bytes():
    p = parse_pulled(PULLED, 2, "j-train-2")
    assert p == ImagePull(attempt=2, pod="j-train-2", image=IMG, present=False,
                          seconds=pytest.approx(101.238), waiting_seconds=pytest.approx(101.238),
                          bytes=6204532418)
    q = parse_pulled(PULLED_QUEUED, 1, "p")
    assert (q.seconds, q.waiting_seconds) == (pytest.approx(0.85), pytest.approx(12.401207311))


def test_an_image_already_present_is_no_pull():
    for message in (PRESENT, PRESENT_NEWER):
        p = parse_pulled(message, 1, "p")
        assert p.present and p.seconds is None and p.bytes is None
    assert parse_pulled(PRESENT, 1, "p").image == "phoenix-trainer:41f1c228616c"


@pytest.mark.parametrize("message", [
    f'Pulling image "{IMG}"', "", f'Successfully pulled image "{IMG}" in soon (later including '
    "waiting)", "Back-off pulling image"])
def test_other_messages_are_not_pulls(message):
    assert parse_pulled(message, 1, "p") is None


def test_status_round_trip_and_description():
    p = parse_pulled(PULLED, 3, "j-train-3")
    d = p.to_dict()
    assert d == {"attempt": 3, "pod": "j-train-3", "image": IMG, "present": False,
                 "seconds": 101.238, "includingWaitingSeconds": 101.238, "bytes": 6204532418}
    assert ImagePull.from_dict(d) == p
    assert ImagePull.from_dict(None) is None and ImagePull.from_dict({"pod": "x"}) is None
    st = PhaseStatus.from_dict({"name": "train", "attempts": 3, "imagePull": d})
    assert st.image_pull == p and st.to_dict()["imagePull"] == d
    assert "imagePull" not in PhaseStatus(name="train").to_dict()
    assert p.describe() == "image pulled in 101.2s, 5.78 GiB"
    assert parse_pulled(PRESENT, 3, "x").describe() == "image already on the node"
    assert image_pull_line(st) == "  start-up (this attempt, pod j-train-3): " + p.describe()
    older = PhaseStatus.from_dict({"name": "train", "attempts": 4, "imagePull": d})
    assert "(attempt 3, pod j-train-3)" in image_pull_line(older)


def _event(message, container="trainer", reason="Pulled", when="2026-01-01T12:00:05Z"):
    return {"reason": reason, "message": message, "lastTimestamp": when,
            "involvedObject": {"kind": "Pod", "fieldPath": f"spec.containers{{{container}}}"}}


def test_from_events_takes_the_trainer_containers_newest_pull():
    p = pod()
    events = [_event(PULLED, container="sidecar"),
              _event(f'Pulling image "{IMG}"', reason="Pulling"),
              _event(PRESENT, when="2026-01-01T12:00:01Z"),
              _event(PULLED, when="2026-01-01T12:00:09Z")]
    got = image_pull.from_events(events, p, 1)
    assert got.seconds == pytest.approx(101.238) and got.pod == POD1
    assert image_pull.from_events(events[:2], p, 1) is None


def _started(p, seconds):
    p["status"]["containerStatuses"][0]["state"] = {"running": {"startedAt": ts(at(seconds))}}
    return p


def test_wanted_reads_a_started_pod_once_and_only_while_fresh():
    status = {"phases": [phase_status(attempts=1)]}
    started = _started(pod(), 0)
    assert [(ph, a, p["metadata"]["name"]) for ph, a, p in
            image_pull.wanted(status, [started], at(30))] == [("train", 1, POD1)]
    # not started yet (pulling): nothing to read
    assert image_pull.wanted(status, [pod(waiting="ContainerCreating")], at(30)) == []
    # the pull is recorded for this attempt: never read again
    done = {"phases": [phase_status(attempts=1, imagePull={"attempt": 1, "pod": POD1,
                                                            "present": True})]}
    assert image_pull.wanted(done, [started], at(30)) == []
    # recorded for the previous attempt: the new one's is read
    older = {"phases": [phase_status(attempts=2, imagePull={"attempt": 1, "present": True})]}
    assert len(image_pull.wanted(older, [_started(pod(attempt=2), 0)], at(30))) == 1
    # started longer ago than the window: left unrecorded, no LIST on every pass
    late = at(image_pull.READ_WINDOW_SECONDS + 1)
    assert image_pull.wanted(status, [started], late) == []
    # a pod of the same name that is not the one the status names (another uid)
    other = _started(pod(), 0)
    other["metadata"]["uid"] = "uid-other"
    assert image_pull.wanted(status, [other], at(30)) == []
    # an ended trainer still shows when it started
    ended = pod(exit_code=0)
    ended["status"]["containerStatuses"][0]["state"]["terminated"]["startedAt"] = ts(at(0))
    assert len(image_pull.wanted(status, [ended], at(30))) == 1


def test_decide_records_the_pull_of_the_current_attempt_only():
    body = with_status(job(), phase_status(attempts=1, startedAt=ts(at(0))))
    p = _started(pod(), 0)
    pull = parse_pulled(PULLED, 1, POD1)
    plan = decide(body, [p], {"train": listing()}, at(30), pulls={POD1: pull})
    assert plan.status["phases"][0]["imagePull"] == pull.to_dict()
    # another attempt's figure (a stale read) is not taken
    stale = parse_pulled(PULLED, 0, POD1)
    plan = decide(body, [p], {"train": listing()}, at(30), pulls={POD1: stale})
    assert "imagePull" not in plan.status["phases"][0]
    # once recorded it stays, with no read in later passes
    again = with_status(job(), phase_status(attempts=1, imagePull=pull.to_dict()))
    plan = decide(again, [p], {"train": listing()}, at(60))
    assert plan.status["phases"][0]["imagePull"] == pull.to_dict()


def test_the_end_record_keeps_its_attempts_pull():
    pull = parse_pulled(PULLED, 2, "j-train-2").to_dict()
    end = AttemptEnd(phase="train", attempt=2, cause="preemption", reason="Evicted",
                     pod="j-train-2", node="spot-1", created=at(0), ended=at(300),
                     exit_code=143, message="", stopped_step=40, checkpoint=None)
    r = history.end_record(end, by={}, gpus=1, pull=pull)
    assert r["imagePull"] == {k: v for k, v in pull.items() if k != "attempt"}
    assert "imagePull" not in history.end_record(end, by={}, gpus=1,
                                                 pull={**pull, "attempt": 3})


class _EventsKube:
    def __init__(self, events):
        self.events, self.calls = events, []

    def list_pulled_events(self, namespace, uid):
        self.calls.append((namespace, uid))
        return self.events


def test_gather_lists_the_events_of_a_pod_that_just_started():
    kube = _EventsKube([_event(PULLED)])

    async def call(fn, *a, **kw):
        return fn(*a, **kw)

    gather = Gather(kube, OperatorConfig(api_workers=1), call, Tombstones())
    body = with_status(job(), phase_status(attempts=1))
    body["metadata"]["namespace"] = "ns"
    got = asyncio.run(gather.image_pulls(body, [_started(pod(), 0)], at(5)))
    assert kube.calls == [("ns", "uid-" + POD1)]
    assert got[POD1].bytes == 6204532418
    # nothing started: no LIST at all
    kube.calls.clear()
    asyncio.run(gather.image_pulls(body, [pod(waiting="ContainerCreating")],
                                   at(5) + timedelta(seconds=1)))
    assert kube.calls == []


def test_the_report_sums_the_ended_attempts_pulls():
    from phoenix_operator import report

    def ended(attempt, pull):
        end = AttemptEnd(phase="train", attempt=attempt, cause="preemption", reason="Evicted",
                         pod=f"p{attempt}", node="spot-1", created=at(100 * attempt),
                         ended=at(100 * attempt + 50), exit_code=143, stopped_step=10)
        return history.end_record(end, by={}, gpus=1, pull=pull)

    records = [ended(1, parse_pulled(PULLED, 1, "p1").to_dict()),
               ended(2, parse_pulled(PULLED_QUEUED, 2, "p2").to_dict()),
               ended(3, parse_pulled(PRESENT, 3, "p3").to_dict()), ended(4, None)]
    doc = report.build_report("j", records)
    assert doc["imagePulls"] == {"pulled": 2, "present": 1, "p50": pytest.approx(0.85),
                                 "p95": pytest.approx(101.238)}
    assert "image pulls:       2 pulled (p50 0.8s, p95 101.2s), 1 already on the node" in \
        report.render_text(doc)
    assert "image pulls" not in report.render_text(report.build_report("j", records[3:]))
