"""The durable history of a job's attempts: what each record says, how records are merged
(append-only), and the numbers derived from them (steps lost, time to resume, GPU-hours,
goodput) for the status summary, ``phoenixctl report`` and ``phoenixctl timeline``.

One object per phase, ``<phase prefix>/history.jsonl`` (``core.layout.HISTORY_KEY``): one
JSON record per line, in the order they were appended. Kinds:

- ``start``: an attempt began - a new pod (gang), a promoted standby (``promoted``), or, in an
  in-place gang, a waiting spare that took a lost member's place (``spare``) - and the step it
  resumes from (for an in-place gang the ``resumed`` record says where it really did);
- ``end``: an attempt ended - cause, reason, pod, node, when its pod was created and when it
  ended, where the trainer stopped, a digest of its attempt log (``digest_attempt_log``) and
  how its pod got its image (``imagePull``, as ``status.phases[].imagePull`` recorded it);
- ``standby``: a warm standby was started; ``notice``: a node announced its reclaim;
  ``handoff``: the operator asked the noticed attempt to hand off to the standby.

Every record carries ``by`` (which operator replica, in which leader term, decided it).
A record is never changed once written: ``merge`` only appends records whose ``key`` is
new, so writing the same record twice (a retried pass, a restarted operator) is harmless.

Pure: no storage, no clock, no API (``phase_storage`` reads and writes the object,
``apply.history`` decides when).
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from phoenix_trainer.core.layout import split_checkpoint_uri

from .phoenixjob import parse_ts

FORMAT_VERSION = 1
KINDS = ("start", "end", "standby", "notice", "handoff", "resumed")
MAX_MESSAGE_CHARS = 300  # a record stays small: 1,000 attempts in one GET
GPU_RESOURCE = "nvidia.com/gpu"

Record = dict[str, Any]


# --- times --------------------------------------------------------------------------------

def iso(value: datetime | None) -> str | None:
    """UTC, millisecond precision (the trainer's attempt log has sub-second times)."""
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: Any) -> datetime | None:
    """``phoenixjob.parse_ts``, lenient: a record's unreadable time is no time (None)."""
    try:
        return parse_ts(str(value)) if value else None
    except ValueError:
        return None


def _seconds(a: Any, b: Any) -> float | None:
    ta, tb = parse_time(a), parse_time(b)
    return (tb - ta).total_seconds() if ta and tb else None


# --- records ----------------------------------------------------------------------------

def key(record: Mapping[str, Any]) -> tuple:
    """What makes a record the same record: one start, end, standby and handoff per attempt;
    one notice per attempt and notice time."""
    kind = record.get("kind")
    extra = record.get("time") if kind == "notice" else None
    return (kind, record.get("phase"), record.get("attempt"), extra)


def _base(kind: str, phase: str, attempt: int, time: datetime | None,
          by: Mapping[str, Any]) -> Record:
    return {"v": FORMAT_VERSION, "kind": kind, "phase": phase, "attempt": int(attempt),
            "time": iso(time), "by": dict(by)}


def step_of(uri: str | None) -> int | None:
    """The step a checkpoint URI names (``.../step-0000000120`` -> 120)."""
    if not uri:
        return None
    step = split_checkpoint_uri(uri)[1]
    if step is None:  # any zero padding
        m = re.search(r"/step-(\d+)/?$", uri)
        step = int(m.group(1)) if m else None
    return step


def start_record(phase: str, attempt: int, pod: str, *, resume_from: str | None, promoted: bool,
                 time: datetime, by: Mapping[str, Any], members: int = 1,
                 previous_cause: str | None = None, spare: bool = False) -> Record:
    r = _base("start", phase, attempt, time, by)
    r.update(pod=pod, resumeFrom=resume_from, resumeStep=step_of(resume_from) or 0,
             promoted=promoted, members=members)
    if spare:
        r["spare"] = True
    if previous_cause:
        r["after"] = previous_cause
    return r


def end_record(end: Any, *, by: Mapping[str, Any], gpus: int,
               digest: Mapping[str, Any] | None = None,
               pull: Mapping[str, Any] | None = None) -> Record:
    """``end``: a ``decide.AttemptEnd``; ``gpus``: per pod; ``digest``: the attempt log's
    (``digest_attempt_log``), if it could be read; ``pull``: the status's ``imagePull``, kept
    when it is this attempt's."""
    r = _base("end", end.phase, end.attempt, end.ended, by)
    r.update(cause=end.cause, reason=end.reason, pod=end.pod, node=end.node,
             created=iso(end.created), exitCode=end.exit_code,
             message=(end.message or "")[:MAX_MESSAGE_CHARS], stoppedStep=end.stopped_step,
             checkpoint=end.checkpoint, members=end.members, gpus=gpus * max(1, end.members))
    d = dict(digest or {})
    last = [s for s in (end.stopped_step, d.get("lastStep")) if s is not None]
    r["lastStep"] = max(last) if last else None
    for k in ("trainStart", "startStep", "trainSeconds", "checkpoints", "lastCheckpointStep"):
        r[k] = d.get(k)
    if pull and pull.get("attempt") == end.attempt:
        r["imagePull"] = {k: v for k, v in pull.items() if k != "attempt"}
    return {k: v for k, v in r.items() if v is not None}


def standby_record(phase: str, attempt: int, pod: str, *, time: datetime,
                   by: Mapping[str, Any]) -> Record:
    r = _base("standby", phase, attempt, time, by)
    r["pod"] = pod
    return r


def notice_records(status: Mapping[str, Any], by: Mapping[str, Any]) -> list[Record]:
    """The notices (and handoffs) the status's phases record, as history records."""
    out: list[Record] = []
    for ph in status.get("phases") or ():
        n = ph.get("lastNotice")
        if not n or n.get("attempt") is None:
            continue
        r = _base("notice", ph["name"], n["attempt"], parse_time(n.get("time")), by)
        r.update(node=n.get("node"), signal=n.get("signal"))
        out.append(r)
        if n.get("handoffTo") is not None:
            h = _base("handoff", ph["name"], n["attempt"], parse_time(n.get("time")), by)
            h.update(to=int(n["handoffTo"]), node=n.get("node"))
            out.append(h)
    return out


def status_records(status: Mapping[str, Any], by: Mapping[str, Any]) -> list[Record]:
    """What the status alone tells (should the detailed records of a pass be lost, e.g. the
    operator restarted before writing them): notices, handoffs and each phase's last failure
    (an ``end`` record marked ``source: status``, without node or attempt-log digest)."""
    out = notice_records(status, by)
    for ph in status.get("phases") or ():
        rep = ph.get("lastReplacement") or {}
        if rep.get("resumedStep") is not None and rep.get("attempt") is not None:
            # an in-place gang's replacement: where it really resumed (peers: the survivors'
            # step, not the checkpoint its new pods were told about)
            r = _base("resumed", ph["name"], rep["attempt"], parse_time(rep.get("time")), by)
            r.update(step=int(rep["resumedStep"]), source=rep.get("recoveredFrom"),
                     seconds=rep.get("trainingAgainSeconds"))
            out.append(r)
        lf = ph.get("lastFailure")
        if lf and lf.get("attempt") is not None:
            r = _base("end", ph["name"], lf["attempt"], parse_time(lf.get("time")), by)
            r.update(cause=lf.get("cause"), reason=lf.get("reason"), pod=lf.get("pod"),
                     exitCode=lf.get("exitCode"), source="status",
                     message=(lf.get("message") or "")[:MAX_MESSAGE_CHARS])
            out.append({k: v for k, v in r.items() if v is not None})
    return out


def gpus_per_pod(template: Mapping[str, Any] | None) -> int:
    """GPUs one trainer pod asks for (limits, else requests, of ``nvidia.com/gpu``)."""
    total = 0
    for c in ((template or {}).get("spec") or {}).get("containers") or ():
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU_RESOURCE) or (res.get("requests") or {}).get(GPU_RESOURCE)
        try:
            total += int(value or 0)
        except (TypeError, ValueError):
            pass
    return total


def digest_attempt_log(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What the history keeps of one attempt's ``metrics/attempt-N.jsonl`` (the trainer's
    own records): when and where it started training, the last step it reported, its
    training seconds (its end record's, else first to last step) and its checkpoints."""
    d: dict[str, Any] = {}
    checkpoints: list[int] = []
    last_time = None
    for e in events:
        ev, step = e.get("event"), e.get("step")
        if ev in ("start", "resume") and "trainStart" not in d:
            d["trainStart"], d["startStep"] = e.get("time"), step
        if step is not None and ev in ("step", "checkpoint", "end"):
            if d.get("lastStep") is None or step >= d["lastStep"]:
                d["lastStep"], last_time = int(step), e.get("time")
        if ev == "checkpoint" and step is not None:
            checkpoints.append(int(step))
        if ev == "end" and e.get("trainSeconds") is not None:
            d["trainSeconds"] = float(e["trainSeconds"])
    if "trainSeconds" not in d and d.get("trainStart") and last_time:
        s = _seconds(d["trainStart"], last_time)
        if s is not None:
            d["trainSeconds"] = max(0.0, s)
    if checkpoints:
        d["checkpoints"] = len(checkpoints)
        d["lastCheckpointStep"] = max(checkpoints)
    return d


# --- merging (append-only) and the file --------------------------------------------------

def merge(existing: Sequence[Record], new: Iterable[Record]) -> tuple[list[Record], list[Record]]:
    """(all records, the ones appended): ``existing`` unchanged, then each new record whose
    key is not there yet (the first of equal keys wins)."""
    seen = {key(r) for r in existing}
    added: list[Record] = []
    for r in new:
        k = key(r)
        if k not in seen:
            seen.add(k)
            added.append(r)
    return list(existing) + added, added


def encode(records: Iterable[Record]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n"
                   for r in records).encode()


class HistoryFormatError(ValueError):
    """A history object that is not JSON lines of records."""


def decode(data: bytes, where: str = "history") -> list[Record]:
    out = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise HistoryFormatError(f"{where} line {n} is not JSON: {e}") from e
        if not isinstance(r, dict) or r.get("kind") not in KINDS:
            raise HistoryFormatError(f"{where} line {n} is not a history record: {line[:80]}")
        out.append(r)
    return out


def newest_term(records: Iterable[Record]) -> Mapping[str, Any]:
    """The ``by`` of the newest leader term that wrote any of ``records``."""
    best: Mapping[str, Any] = {}
    for r in records:
        b = r.get("by") or {}
        if b.get("lease") and (not best or (b.get("lease") == best.get("lease")
                                            and int(b.get("term") or 0) > int(best.get("term") or 0))):
            best = b
    return best


# --- derived numbers -----------------------------------------------------------------------

def attempts(records: Iterable[Record], phase: str) -> dict[int, dict[str, Record]]:
    """attempt -> {kind: record} of one phase (notices: the latest)."""
    out: dict[int, dict[str, Record]] = {}
    for r in records:
        if r.get("phase") == phase:
            out.setdefault(int(r["attempt"]), {})[r["kind"]] = r
    return dict(sorted(out.items()))


def phases(records: Iterable[Record]) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r.get("phase") not in seen:
            seen.append(r["phase"])
    return seen


def disruptions(records: Sequence[Record], phase: str,
                train_starts: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
    """Each ended attempt of ``phase`` with the attempt that followed it: steps lost (the
    last step it reached minus the step the next one resumed from), time to resume (its end
    to the next one's first training step: ``train_starts``, else that attempt's own end
    record), GPU-hours paid (pod created to end) and trained (its training seconds, the lost
    steps' share taken out)."""
    by_attempt = attempts(records, phase)
    starts = {a: k["start"] for a, k in by_attempt.items() if "start" in k}
    ends = {a: k["end"] for a, k in by_attempt.items() if "end" in k}
    known_starts = dict(train_starts or {})
    for a, e in ends.items():
        if e.get("trainStart"):
            known_starts.setdefault(a, e["trainStart"])
    rows = []
    for a, e in ends.items():
        later = sorted(n for n in starts if n > a)
        nxt = later[0] if later else None
        actual = by_attempt[nxt].get("resumed") if nxt is not None else None  # in-place
        resumed = (actual["step"] if actual else starts[nxt].get("resumeStep", 0)
                   if nxt is not None else None)
        last = e.get("lastStep")
        lost = max(0, last - resumed) if last is not None and resumed is not None else None
        if e.get("cause") == "completed":
            lost = 0
        ttr = _seconds(e.get("time"), known_starts.get(nxt)) if nxt is not None else None
        gpus = int(e.get("gpus") or 0)
        paid = _seconds(e.get("created"), e.get("time"))
        paid_h = max(0.0, paid) * gpus / 3600 if paid is not None else None
        train = e.get("trainSeconds")
        first = e.get("startStep")
        trained_h = None
        if train is not None:
            kept = 1.0
            if lost and last is not None and first is not None and last > first:
                kept = max(0.0, 1 - lost / (last - first))
            trained_h = float(train) * kept * gpus / 3600
            if paid_h is not None:
                trained_h = min(trained_h, paid_h)
        rows.append({"phase": phase, "attempt": a, "cause": e.get("cause"),
                     "reason": e.get("reason"), "pod": e.get("pod"), "node": e.get("node"),
                     "ended": e.get("time"), "lastStep": last, "next": nxt,
                     "resumedFrom": resumed, "stepsLost": lost,
                     "timeToResume": round(ttr, 3) if ttr is not None else None,
                     "promoted": bool(starts[nxt].get("promoted")) if nxt is not None else None,
                     "spare": bool(starts[nxt].get("spare")) if nxt is not None else None,
                     "gpuHoursPaid": paid_h, "gpuHoursTrained": trained_h})
    return rows


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    """The bounded summary in ``status.history``: counts by cause, steps lost, GPU-hours
    paid and trained, goodput (trained / paid) - over every phase's ended attempts."""
    by_cause: dict[str, int] = {}
    lost = 0
    paid = trained = 0.0
    n = 0
    for phase in phases(records):
        for row in disruptions(records, phase):
            n += 1
            by_cause[row["cause"] or "unknown"] = by_cause.get(row["cause"] or "unknown", 0) + 1
            lost += row["stepsLost"] or 0
            paid += row["gpuHoursPaid"] or 0.0
            trained += row["gpuHoursTrained"] or 0.0
    out: dict[str, Any] = {"attemptsEnded": n, "byCause": by_cause, "stepsLost": lost,
                           "gpuHoursPaid": round(paid, 4), "gpuHoursTrained": round(trained, 4)}
    if paid > 0:
        out["goodput"] = round(trained / paid, 4)
    return out
