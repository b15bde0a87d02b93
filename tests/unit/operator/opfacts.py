"""Builders for PhoenixJob and pod dicts in the API's JSON shape, for decision tests."""
from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone

from phoenix_operator import constants as C
from phoenix_operator.decide import Checkpoint, Listing
from phoenix_operator.phoenixjob import ts
from phoenix_operator.podspec import pod_name

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def job(phases=("train",), *, status=None, suspend=False, recovery=None, name="j",
        independent=(), depends=None):
    spec_phases = []
    for p in phases:
        entry = {"name": p}
        if p in independent:
            entry["independent"] = True
        if depends and p in depends:
            entry["dependsOn"] = depends[p]
        spec_phases.append(entry)
    body = {
        "apiVersion": "phoenix.dev/v1alpha1", "kind": "PhoenixJob",
        "metadata": {"name": name, "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {
            "template": {"spec": {"containers": [{"name": "trainer", "image": "img",
                                                  "command": ["python", "-m", "t"]}]}},
            "phases": spec_phases,
            "checkpoint": {"uri": "s3://bucket/run", "credentialsSecret": "creds",
                           "endpoint": "http://127.0.0.1:9000"},
            "recovery": recovery or {"maxFailures": 2, "backoff": {"initialSeconds": 10,
                                                                   "maxSeconds": 60}},
            "suspend": suspend,
        },
    }
    if status is not None:
        body["status"] = status
    return body


def phase_status(name="train", state="Running", attempts=1, **kw):
    d = {"name": name, "state": state, "attempts": attempts, "preemptions": 0, "failures": 0,
         "pod": pod_name("j", name, attempts),
         "podUID": "uid-" + pod_name("j", name, attempts)}
    d.update(kw)
    return d


def status(*phases, phase="Running"):
    return {"phase": phase, "phases": list(phases)}


def with_status(body, *phases):
    body = copy.deepcopy(body)
    body["status"] = status(*phases)
    return body


def pod(phase="train", attempt=1, *, pod_phase="Running", exit_code=None, reason=None,
        message=None, term_reason=None, disruption=None, deletion=None, waiting=None,
        status_reason=None, finished=at(0), resume=None, node=None):
    name = pod_name("j", phase, attempt)
    annotations = {}
    if resume:
        annotations[C.ANNOTATION_RESUME_FROM] = resume
    p = {
        "metadata": {"name": name, "namespace": "ns", "annotations": annotations,
                     "uid": f"uid-{name}",
                     "labels": {C.LABEL_JOB: "j", C.LABEL_PHASE: phase,
                                C.LABEL_ATTEMPT: str(attempt)}},
        "spec": {"containers": [{"name": "trainer"}]},
        "status": {"phase": pod_phase, "conditions": [], "containerStatuses": [
            {"name": "trainer", "state": {}}]},
    }
    if node:
        p["spec"]["nodeName"] = node
    cs = p["status"]["containerStatuses"][0]
    if exit_code is not None:
        term = {"exitCode": exit_code, "finishedAt": ts(finished)}
        if reason:
            term["reason"] = reason
        if term_reason or message:
            term["message"] = json.dumps({"reason": term_reason or "failed",
                                          "step": 40, "checkpoint": "s3://bucket/run/train/step-40",
                                          "emergencySaveCompleted": True,
                                          "message": message or ""})
        cs["state"] = {"terminated": term}
    elif waiting:
        cs["state"] = {"waiting": {"reason": waiting, "message": "boom"}}
    else:
        cs["state"] = {"running": {}}
    if disruption:
        p["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True",
                                          "reason": disruption, "message": "evicted"})
    if deletion:
        p["metadata"]["deletionTimestamp"] = ts(deletion)
    if status_reason:
        p["status"]["reason"] = status_reason
    return p


def listing(*steps, invalid=(), phase="train"):
    cks = [Checkpoint(step=s, uri=f"s3://bucket/run/{phase}/step-{s:08d}",
                      valid=s not in invalid, reason="sha256 mismatch" if s in invalid else "")
           for s in steps]
    return Listing(tuple(cks))


def listings(**per_phase):
    return {k: v for k, v in per_phase.items()}


NO_CK_LISTING = {"train": Listing(())}
