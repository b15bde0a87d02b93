"""The durable history: its records (append-only merge, file format), the numbers derived
from them (steps lost, time to resume, GPU-hours, goodput) as the status summary and
``phoenixctl report`` show them, the terminal timeline's width, and the apply step that writes
it after the replacement pod exists and never fails the pass. In-memory storage fakes."""
import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest

from phoenix_operator import history, report, timeline
from phoenix_operator.config import OperatorConfig
from phoenix_operator.decide import AttemptEnd, decide
from phoenix_operator.reconcile import Reconciler

from opfacts import at, job, listing, phase_status, pod, with_status
from test_reconcile_apply import FakeKube

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, 10, 0, 0, tzinfo=timezone.utc)
BY = {"replica": "op-0", "term": 3, "lease": "L"}


def t(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def end(attempt, cause, reason, created, ended, *, stopped=None, node="spot-1", members=1):
    return AttemptEnd(phase="train", attempt=attempt, cause=cause, reason=reason, ended=t(ended),
                      pod=f"j-train-{attempt}", node=node, created=t(created),
                      stopped_step=stopped, members=members)


def log(start_s, start_step, steps, *, train_seconds=None, checkpoints=()):
    """An attempt log: start/resume at start_s, one step per second after it."""
    ev = [{"event": "resume" if start_step else "start", "step": start_step,
           "time": history.iso(t(start_s))}]
    for i, s in enumerate(range(start_step + 1, steps + 1)):
        ev.append({"event": "step", "step": s, "time": history.iso(t(start_s + i + 1))})
        if s in checkpoints:
            ev.append({"event": "checkpoint", "step": s, "time": history.iso(t(start_s + i + 1))})
    if train_seconds is not None:
        ev.append({"event": "end", "step": steps, "trainSeconds": train_seconds,
                   "time": history.iso(t(start_s + steps - start_step))})
    return ev


def three_attempts():
    """Attempt 1 preempted (evicted, stopped at 130, resumed from 120 by the standby, attempt
    2), attempt 2 failed (killed; its log got to 200; attempt 3 resumed from 180), attempt 3
    completed at 300. One GPU per pod."""
    r = [history.start_record("train", 1, "j-train-1", resume_from=None, promoted=False,
                              time=t(0), by=BY),
         history.standby_record("train", 2, "j-train-2", time=t(20), by=BY)]
    d1 = history.digest_attempt_log(log(10, 0, 130, checkpoints=(60, 120)))
    r.append(history.end_record(end(1, "preemption", "Evicted", 0, 140, stopped=130), by=BY,
                                gpus=1, digest=d1))
    r.append(history.start_record("train", 2, "j-train-2", resume_from="s3://b/p/train/step-0000000120",
                                  promoted=True, time=t(141), by=BY, previous_cause="preemption"))
    d2 = history.digest_attempt_log(log(146, 120, 200, checkpoints=(180,)))
    r.append(history.end_record(end(2, "failure", "Error", 20, 230), by=BY, gpus=1, digest=d2))
    r.append(history.start_record("train", 3, "j-train-3", resume_from="s3://b/p/train/step-0000000180",
                                  promoted=False, time=t(240), by=BY, previous_cause="failure"))
    d3 = history.digest_attempt_log(log(250, 180, 300, train_seconds=120.0))
    r.append(history.end_record(end(3, "completed", "Completed", 240, 375), by=BY, gpus=1,
                                digest=d3))
    return r


def test_steps_lost_and_time_to_resume_per_disruption():
    rows = {r["attempt"]: r for r in history.disruptions(three_attempts(), "train")}
    assert rows[1]["lastStep"] == 130 and rows[1]["resumedFrom"] == 120
    assert rows[1]["stepsLost"] == 10
    assert rows[1]["timeToResume"] == 6.0  # ended at 140, attempt 2 trained from 146
    assert rows[1]["promoted"] is True
    assert rows[2]["lastStep"] == 200 and rows[2]["stepsLost"] == 20
    assert rows[2]["timeToResume"] == 20.0  # 230 -> 250
    assert rows[3]["stepsLost"] == 0 and rows[3]["next"] is None


def test_gpu_hours_and_goodput():
    rows = {r["attempt"]: r for r in history.disruptions(three_attempts(), "train")}
    assert rows[1]["gpuHoursPaid"] == pytest.approx(140 / 3600)
    # attempt 1 trained 130 s for 130 steps, 10 of them lost
    assert rows[1]["gpuHoursTrained"] == pytest.approx(130 * (120 / 130) / 3600)
    assert rows[3]["gpuHoursTrained"] == pytest.approx(120 / 3600)  # its end record's seconds
    s = history.summarize(three_attempts())
    assert s["attemptsEnded"] == 3
    assert s["byCause"] == {"preemption": 1, "failure": 1, "completed": 1}
    assert s["stepsLost"] == 30
    paid = (140 + 210 + 135) / 3600
    assert s["gpuHoursPaid"] == pytest.approx(paid, abs=1e-4)
    assert 0 < s["goodput"] < 1
    assert s["goodput"] == pytest.approx(s["gpuHoursTrained"] / s["gpuHoursPaid"], abs=1e-3)


def test_merge_is_append_only_and_idempotent():
    recs = three_attempts()
    merged, added = history.merge(recs[:3], recs)
    assert merged[:3] == recs[:3] and added == recs[3:]
    again, added = history.merge(merged, recs)
    assert again == merged and added == []
    # the same attempt's end told differently later (e.g. rebuilt from the status): kept as first written
    other = dict(recs[2], reason="SomethingElse")
    assert history.merge(merged, [other])[1] == []
    assert history.decode(history.encode(merged)) == merged


def test_decode_names_the_bad_line():
    with pytest.raises(history.HistoryFormatError, match="line 2"):
        history.decode(b'{"kind":"start","phase":"p","attempt":1}\nnot json\n', "h")
    with pytest.raises(history.HistoryFormatError, match="not a history record"):
        history.decode(b'{"kind":"nope"}\n')


def test_status_records_rebuild_the_last_failure_and_notices():
    st = {"phases": [{"name": "train", "lastFailure": {"cause": "preemption", "reason": "Evicted",
                                                        "attempt": 4, "time": "2026-03-01T10:00:00Z"},
                      "lastNotice": {"node": "spot-1", "signal": "taint x", "attempt": 4,
                                     "time": "2026-03-01T09:59:50Z", "handoffTo": 5}}]}
    kinds = {(r["kind"], r["attempt"]) for r in history.status_records(st, BY)}
    assert kinds == {("end", 4), ("notice", 4), ("handoff", 4)}


def test_gpus_per_pod_from_the_template():
    tpl = {"spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": "4"}}},
                                   {"resources": {"requests": {"nvidia.com/gpu": 1}}}, {}]}}
    assert history.gpus_per_pod(tpl) == 5
    assert history.gpus_per_pod(None) == 0


def test_report_numbers():
    doc = report.build_report("ns/j", three_attempts())
    assert (doc["preemptions"], doc["failures"], doc["completed"]) == (1, 1, 1)
    assert doc["stepsLost"] == {"total": 30, "byCause": {"preemption": 10, "failure": 20},
                                "byReason": {"Evicted": 10, "Error": 20}}
    assert doc["timeToResume"] == {"count": 2, "p50": 6.0, "p95": 20.0}
    gh = doc["gpuHours"]
    assert gh["preemptionCost"] == pytest.approx((140 - 120) / 3600, abs=1e-4)
    assert [d["attempt"] for d in doc["disruptions"]] == [1, 2]
    json.dumps(doc)  # -o json
    text = report.render_text(doc)
    assert max(map(len, text.splitlines())) <= 100
    assert "p50 6.0s, p95 20.0s" in text


def test_time_to_resume_of_the_running_attempt_comes_from_its_log():
    recs = three_attempts()[:4]  # attempt 2 still running: no end record
    doc = report.build_report("ns/j", recs, {"train": {2: log(146, 120, 150)}})
    assert doc["timeToResume"]["p50"] == 6.0


def test_percentile_nearest_rank():
    assert report.percentile([], 50) is None
    assert report.percentile([3, 1, 2], 50) == 2
    assert report.percentile(list(range(1, 101)), 95) == 95


def test_timeline_text_fits_100_columns_and_shows_every_attempt():
    recs = three_attempts() + [history.notice_records(
        {"phases": [{"name": "train", "lastNotice": {"node": "spot-1", "signal": "taint",
                                                    "attempt": 1, "time": history.iso(t(120)),
                                                    "handoffTo": 2}}]}, BY)][0]
    logs = {"train": {1: log(10, 0, 130, checkpoints=(60, 120))}}
    lanes = timeline.build(recs, logs, now=t(400))
    text = timeline.render_text("PhoenixJob ns/" + "x" * 150, lanes, now=t(400))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    bar = next(line for line in lines if line.startswith("train "))
    for mark in (timeline.MARK["preemption"], timeline.MARK["failure"], timeline.MARK["completed"]):
        assert mark in bar
    standby = lines[lines.index(bar) + 1]
    assert standby.startswith("  standby") and timeline.STANDBY in standby
    marks = lines[lines.index(bar) + 2]
    assert timeline.NOTICE in marks or timeline.HANDOFF in marks
    assert timeline.CHECKPOINT in marks
    assert any("#1 preemption (Evicted) on spot-1" in line and "10 steps lost" in line for line in lines)
    assert any("#2 failure" in line and "was the standby" in line for line in lines)


def test_timeline_gang_lanes_per_member():
    recs = [history.start_record("train", 1, "j-train-1.0", resume_from=None, promoted=False,
                                 time=t(0), by=BY, members=2),
            history.end_record(AttemptEnd(phase="train", attempt=1, cause="preemption",
                                          reason="Evicted", ended=t(50), pod="j-train-1.1",
                                          members=2), by=BY, gpus=1)]
    lanes = timeline.build(recs)
    assert [lane.name for lane in lanes] == ["train/0", "train/1"]
    assert [b.culprit for lane in lanes for b in lane.bars] == [False, True]
    text = timeline.render_text("g", lanes, width=60)
    assert max(map(len, text.splitlines())) <= 60


def test_timeline_image(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "t.svg"
    timeline.render_image("PhoenixJob ns/j", timeline.build(three_attempts()), str(out))
    assert out.read_text().lstrip().startswith("<?xml") and "#1" in out.read_text()


# --- the apply step -------------------------------------------------------------------


class HistoryKube(FakeKube):
    def __init__(self):
        super().__init__()
        self.job = None

    def get_job(self, namespace, name):
        return self.job

    def patch_status(self, job, status):
        if "phases" not in status:
            self.calls.append(("summary", status["history"]))
            return job
        return super().patch_status(job, status)


class MemoryHistory:
    def __init__(self, fail=0):
        self.objects: dict[str, list] = {}
        self.fail = fail

    def append(self, spec, phase, records, *, credentials, writer):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("S3 down")
        merged, _ = history.merge(self.objects.get(phase, []), records)
        self.objects[phase] = merged
        return merged

    def read(self, spec, phase, *, credentials):
        return list(self.objects.get(phase, []))


def _apply(kube, store, body, pods):
    body = {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}
    kube.job = body
    plan = decide(body, pods, {"train": listing(40)}, at(1))
    reconciler = Reconciler(kube, OperatorConfig(api_workers=1))
    reconciler.applier.fence_writer = lambda *a, **kw: kube.calls.append(("fence",))
    book = reconciler.applier.history
    book.append, book.read = store.append, store.read

    def read_log(spec, phase, attempt, *, credentials):
        kube.calls.append(("read-log", attempt))
        return log(0, 0, 45)
    book.read_log = read_log
    orig = store.append

    def append(*a, **kw):
        kube.calls.append(("history",))
        return orig(*a, **kw)
    book.append = append
    asyncio.run(reconciler.apply(body, plan))
    return reconciler


def test_history_is_written_after_the_replacement_pod_and_summarized():
    kube, store = HistoryKube(), MemoryHistory()
    evicted = pod(pod_phase="Failed", exit_code=143, term_reason="preempted",
                  disruption="EvictionByEvictionAPI", node="spot-1")
    _apply(kube, store, with_status(job(), phase_status()), [evicted])
    kinds = [c[0] for c in kube.calls]
    assert kinds.index("create") < kinds.index("history") < kinds.index("summary")
    recs = store.objects["train"]
    ended = next(r for r in recs if r["kind"] == "end")
    assert (ended["attempt"], ended["cause"], ended["node"]) == (1, "preemption", "spot-1")
    assert ended["lastStep"] == 45  # the log got further than the termination message's 40
    assert ended["by"]["replica"]
    started = next(r for r in recs if r["kind"] == "start")
    assert (started["attempt"], started["resumeStep"], started["after"]) == (2, 40, "preemption")
    summary = next(c[1] for c in kube.calls if c[0] == "summary")
    assert summary["byCause"] == {"preemption": 1} and summary["stepsLost"] == 5


def test_a_failed_history_write_does_not_fail_the_pass_and_is_retried():
    kube, store = HistoryKube(), MemoryHistory(fail=1)
    evicted = pod(pod_phase="Failed", exit_code=143, term_reason="preempted",
                  disruption="EvictionByEvictionAPI")
    reconciler = _apply(kube, store, with_status(job(), phase_status()), [evicted])
    assert "create" in [c[0] for c in kube.calls]  # the replacement exists regardless
    assert store.objects == {}
    pending = reconciler.applier.history.pending["u-1"]
    assert {r["kind"] for r in pending} == {"end", "start"}
    # the next pass (nothing new happened) writes what was kept
    body = {**kube.job, "status": kube.job["status"]}
    plan = decide(body, [], {"train": listing(40)}, at(2))
    plan.ended.clear()
    asyncio.run(reconciler.apply(body, plan))
    assert {r["kind"] for r in store.objects["train"]} >= {"end", "start"}
    assert reconciler.applier.history.pending["u-1"] == []


def test_cli_history_commands_parse_and_order_pods():
    from phoenix_operator import constants as C
    from phoenix_operator.kubectl_phoenix import parse_args, pod_order

    a = parse_args(["report", "j", "-o", "json", "--endpoint", "http://s3:9000"])
    assert (a.job, a.output, a.endpoint, a.fn.__name__) == ("j", "json", "http://s3:9000", "report")
    a = parse_args(["timeline", "j", "--out", "t.png", "-n", "ns"])
    assert (a.out, a.namespace) == ("t.png", "ns")
    a = parse_args(["logs", "j", "--attempt", "3", "--member", "1"])
    assert (a.attempt, a.member) == (3, 1)

    def p(phase, attempt, member=0):
        return {"metadata": {"name": f"{phase}-{attempt}.{member}", "labels": {
            C.LABEL_PHASE: phase, C.LABEL_ATTEMPT: str(attempt), C.LABEL_MEMBER: str(member)}}}
    pods = [p("eval", 1), p("train", 10, 1), p("train", 2), p("train", 10, 0)]
    assert [x["metadata"]["name"] for x in pod_order(pods, ["train", "eval"])] == [
        "train-2.0", "train-10.0", "train-10.1", "eval-1.0"]


def test_an_in_place_replacement_counts_the_step_it_resumed_at_not_the_checkpoint():
    """gangRestart Member: the new attempt's pods are told the newest checkpoint (step 120),
    but the gang resumed from its survivors at step 130 (lastReplacement.resumedStep): 0 lost."""
    records = three_attempts()
    st = {"phases": [{"name": "train", "lastReplacement": {
        "attempt": 2, "time": "2026-03-01T10:02:21Z", "members": [1], "lostPods": ["p"],
        "pods": ["q"], "cause": "preemption", "reason": "Evicted", "recoveredFrom": "peers",
        "resumedStep": 130, "trainingAgainSeconds": 7.5}}]}
    resumed = [r for r in history.status_records(st, BY) if r["kind"] == "resumed"]
    assert [(r["attempt"], r["step"], r["source"]) for r in resumed] == [(2, 130, "peers")]
    merged, _ = history.merge(records, resumed)
    rows = {r["attempt"]: r for r in history.disruptions(merged, "train")}
    assert rows[1]["resumedFrom"] == 130 and rows[1]["stepsLost"] == 0
    assert history.decode(history.encode(merged)) == merged
