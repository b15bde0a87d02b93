"""How long a trainer pod waited for its image: the kubelet's ``Pulled`` event, read once.

The kubelet says it on the pod, as an Event with reason ``Pulled``, in one of two shapes
(kubelet 1.35, ``pkg/kubelet/images``):

- ``Successfully pulled image "IMG" in 1m2.5s (1m4s including waiting). Image size: N bytes.``
- ``Container image "IMG" already present on machine`` (newer kubelets may add "and can be
  accessed by the pod").

``parse_pulled`` turns one message into an ``ImagePull``; ``wanted`` says which pods' events
a pass should read (the current attempt's pod, once its trainer container started, while its
pull is not yet recorded and the events are fresh: a bounded, one-LIST-per-pod read, not a
watch); ``from_events`` picks the trainer container's event. ``decide`` records the result
in ``status.phases[].imagePull``; ``history`` keeps it in the attempt's ``end`` record.

Pure: no API calls, no clock reads.
"""
from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime
from typing import Any, Iterable, Mapping

from .constants import DELETED_KEY
from .outcomes import trainer_container_name
from .phoenixjob import ImagePull, PhaseStatus, parse_ts

REASON_PULLED = "Pulled"
# Events live an hour; a pod whose trainer started longer ago than this is not read again
# (its pull stays unrecorded instead of costing a LIST on every pass).
READ_WINDOW_SECONDS = 600.0

_PULLED = re.compile(r'^Successfully pulled image "(?P<image>[^"]*)" in (?P<pull>[0-9.a-zµ]+)'
                     r' \((?P<waiting>[0-9.a-zµ]+) including waiting\)'
                     r'(?:\. Image size: (?P<bytes>\d+) bytes)?')
_PRESENT = re.compile(r'^Container image "(?P<image>[^"]*)" already present on machine')
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float | None:
    """Seconds in a Go ``time.Duration`` string (``1m2.5s``, ``850.3ms``, ``0s``)."""
    if text == "0":
        return 0.0
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


def parse_pulled(message: str, attempt: int, pod: str) -> ImagePull | None:
    """One ``Pulled`` event's message as an ``ImagePull`` (None: not a shape we know)."""
    m = _PULLED.match(message or "")
    if m:
        seconds, waiting = go_duration(m["pull"]), go_duration(m["waiting"])
        if seconds is None:
            return None
        return ImagePull(attempt=attempt, pod=pod, image=m["image"], present=False,
                         seconds=seconds, waiting_seconds=waiting,
                         bytes=int(m["bytes"]) if m["bytes"] else None)
    m = _PRESENT.match(message or "")
    if m:
        return ImagePull(attempt=attempt, pod=pod, image=m["image"], present=True)
    return None


def from_events(events: Iterable[Mapping[str, Any]], pod: Mapping[str, Any],
                attempt: int) -> ImagePull | None:
    """The trainer container's pull among a pod's events (the newest, if several)."""
    container = trainer_container_name(pod)
    name = pod["metadata"]["name"]
    field = f"spec.containers{{{container}}}"
    mine = [e for e in events if e.get("reason") == REASON_PULLED
            and (e.get("involvedObject") or {}).get("fieldPath") in (field, None)]
    mine.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    for event in reversed(mine):
        pull = parse_pulled(str(event.get("message") or ""), attempt, name)
        if pull is not None:
            return pull
    return None


def _started_at(pod: Mapping[str, Any], container: str | None) -> str | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        if cs.get("name") != container:
            continue
        state = cs.get("state") or {}
        for kind in ("running", "terminated"):
            if (state.get(kind) or {}).get("startedAt"):
                return state[kind]["startedAt"]
    return None


def wanted(status: Mapping[str, Any], pods: Iterable[Mapping[str, Any]],
           now: datetime) -> list[tuple[str, int, Mapping[str, Any]]]:
    """(phase, attempt, pod) whose events to read in this pass: each phase's current pod,
    once its trainer container started (so the pull is over and its event posted), while the
    phase records no pull for this attempt and the start is within ``READ_WINDOW_SECONDS``."""
    by_name = {p["metadata"]["name"]: p for p in pods if not p.get(DELETED_KEY)}
    out = []
    for ph in status.get("phases") or ():
        pod = by_name.get(ph.get("pod") or "")
        attempt = int(ph.get("attempts") or 0)
        recorded = ImagePull.from_dict(ph.get("imagePull"))
        if pod is None or attempt == 0 or (recorded is not None and recorded.attempt == attempt):
            continue
        if ph.get("podUID") and pod["metadata"].get("uid") != ph["podUID"]:
            continue
        started = _started_at(pod, trainer_container_name(pod))
        if started is None:
            continue
        try:
            since = (now - parse_ts(started)).total_seconds()
        except ValueError:
            continue
        if since <= READ_WINDOW_SECONDS:
            out.append((ph["name"], attempt, pod))
    return out


def record(st: PhaseStatus, pulls: Mapping[str, ImagePull]) -> PhaseStatus:
    """``st`` with the pull of its current pod, if this pass read one for this attempt."""
    pull = pulls.get(st.pod or "")
    if pull is None or pull.attempt != st.attempts or st.image_pull == pull:
        return st
    return replace(st, image_pull=pull)
