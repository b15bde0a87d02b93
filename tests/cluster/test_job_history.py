"""The durable history on the lab: an evicted attempt gets its records in the phase's
history.jsonl (written by the operator after the replacement pod exists), the status
summarizes them, `phoenixctl report` reads them with the user's credentials, and all of it
survives the operator's restart and the deletion of every pod."""
from __future__ import annotations

import json

import pytest

from phoenix_operator import history
from phoenix_operator.podspec import pod_name
from phoenix_trainer.core.layout import HISTORY_KEY

from pxj_helpers import (create, env_of, get, phase_status, phoenix_cli, phoenixjob, pod_or_none,
                         wait)
from test_operator import LONG, has_checkpoints, running, storage_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def records(s3, bucket) -> list[dict]:
    try:
        return history.decode(storage_for(s3, bucket).get_bytes(HISTORY_KEY))
    except FileNotFoundError:
        return []


def kinds(recs) -> set[tuple[str, int]]:
    return {(r["kind"], r["attempt"]) for r in recs}


def test_history_of_an_eviction_survives_operator_restart_and_every_pod_deleted(
        lab, lab_s3, operator, core, custom, ns, bucket):
    create(custom, ns, phoenixjob("hi", bucket, lab_s3.url, image=lab.trainer_image, env=LONG))
    wait(lambda: running(core, ns, pod_name("hi", "train", 1)), 60, "attempt 1 running")
    wait(lambda: has_checkpoints(lab_s3, bucket, 2), 60, "two checkpoints")
    node = core.read_namespaced_pod(pod_name("hi", "train", 1), ns).spec.node_name
    lab.evict(ns, pod_name("hi", "train", 1))
    pod2 = wait(lambda: pod_or_none(core, ns, pod_name("hi", "train", 2)), 60, "attempt 2's pod")
    resumed = env_of(pod2)["PHOENIX_RESUME_FROM"]
    recs = wait(lambda: (r := records(lab_s3, bucket)) and {("end", 1), ("start", 2)} <= kinds(r) and r,
                30, "history records of attempt 1's end and attempt 2's start")
    end1 = next(r for r in recs if r["kind"] == "end" and r["attempt"] == 1)
    assert (end1["cause"], end1["reason"], end1["node"]) == ("preemption", "EvictionByEvictionAPI", node)
    assert end1["by"]["replica"] and end1["pod"] == pod_name("hi", "train", 1)
    start2 = next(r for r in recs if r["kind"] == "start" and r["attempt"] == 2)
    assert start2["resumeFrom"] == resumed and start2["after"] == "preemption"
    # status.history can be written before the end record is summarized (attemptsEnded 0)
    summary = wait(lambda: (h := (get(custom, ns, "hi").get("status") or {}).get("history"))
                   and h.get("attemptsEnded") and h, 30, "status.history with attempt 1's end")
    assert summary["byCause"] == {"preemption": 1} and summary["attemptsEnded"] == 1
    doc = json.loads(phoenix_cli(lab, "report", "hi", "-n", ns, "-o", "json"))
    assert doc["preemptions"] == 1 and doc["failures"] == 0
    [d] = doc["disruptions"]
    assert d["stepsLost"] == end1["lastStep"] - start2["resumeStep"]
    assert lab_s3.secret_key not in phoenix_cli(lab, "timeline", "hi", "-n", ns)
    text = phoenix_cli(lab, "logs", "hi", "-n", ns, "--attempt", "2")
    assert text.startswith(f"==> {pod_name('hi', 'train', 2)} (phase train, attempt 2, member 0"), text
    before = storage_for(lab_s3, bucket).get_bytes(HISTORY_KEY)

    # The operator goes, every pod goes (attempt 2's deletion by someone else is a
    # preemption too), the operator comes back.
    operator.kill()
    for p in core.list_namespaced_pod(ns).items:
        core.delete_namespaced_pod(p.metadata.name, ns, grace_period_seconds=0)
    wait(lambda: not core.list_namespaced_pod(ns).items, 60, "every pod gone")
    operator.start()
    wait(lambda: running(core, ns, pod_name("hi", "train", 3)), 90, "attempt 3 running")
    recs = wait(lambda: (r := records(lab_s3, bucket)) and {("end", 2), ("start", 3)} <= kinds(r) and r,
                30, "history records of attempt 2's end and attempt 3's start")
    assert storage_for(lab_s3, bucket).get_bytes(HISTORY_KEY).startswith(before)  # nothing rewritten
    assert phase_status(get(custom, ns, "hi"))["preemptions"] == 2
    doc = json.loads(phoenix_cli(lab, "report", "hi", "-n", ns, "-o", "json"))
    assert doc["preemptions"] == 2 and [d["attempt"] for d in doc["disruptions"]] == [1, 2]
    wait(lambda: (get(custom, ns, "hi").get("status") or {}).get("history", {}).get("byCause")
         == {"preemption": 2}, 30, "status.history counts both")
