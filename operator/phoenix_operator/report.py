"""``phoenixctl report``'s numbers, from a job's history (``history``) and, for attempts the
history has not seen end yet, their attempt logs: per disruption the steps lost and the
time to resume; totals (preemptions, failures, steps lost by cause, time to resume p50/p95,
GPU-hours paid and trained, the GPU-hours preemptions cost, goodput, image pulls) and their
text form.

The lab's demo prints its summary with the same ``build_report``/``render_text``. Pure: the
CLI reads storage and hands the records in.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from . import history
from .history import Record

WIDTH = 100


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def train_starts(logs: Mapping[int, Iterable[Mapping[str, Any]]]) -> dict[int, str]:
    """attempt -> when it started (or resumed) training, from attempt logs."""
    out = {}
    for attempt, events in logs.items():
        start = history.digest_attempt_log(events).get("trainStart")
        if start:
            out[attempt] = start
    return out


def build_report(job: str, records: Sequence[Record],
                 logs: Mapping[str, Mapping[int, Iterable[Mapping[str, Any]]]] | None = None
                 ) -> dict[str, Any]:
    """The report document (``-o json|yaml`` prints it as is). ``logs``: phase -> attempt ->
    attempt-log events, for the attempts whose training start the history lacks."""
    logs = logs or {}
    rows: list[dict[str, Any]] = []
    for phase in history.phases(records):
        rows += history.disruptions(records, phase, train_starts(logs.get(phase, {})))
    counts: dict[str, int] = {}
    lost_by_cause: dict[str, int] = {}
    lost_by_reason: dict[str, int] = {}
    ttr: list[float] = []
    paid = trained = cost = 0.0
    for r in rows:
        cause = r["cause"] or "unknown"
        counts[cause] = counts.get(cause, 0) + 1
        if cause != "completed":
            lost = r["stepsLost"] or 0
            lost_by_cause[cause] = lost_by_cause.get(cause, 0) + lost
            reason = r["reason"] or "unknown"
            lost_by_reason[reason] = lost_by_reason.get(reason, 0) + lost
            if r["timeToResume"] is not None:
                ttr.append(r["timeToResume"])
        p, t = r["gpuHoursPaid"] or 0.0, r["gpuHoursTrained"] or 0.0
        paid, trained = paid + p, trained + t
        if cause == "preemption":
            cost += max(0.0, p - t)
    pulls = [e["imagePull"] for e in records
             if e.get("kind") == "end" and isinstance(e.get("imagePull"), Mapping)]
    pulled = [float(p["seconds"]) for p in pulls if not p.get("present") and p.get("seconds") is not None]
    return {
        "job": job,
        "attempts": len(rows),
        "preemptions": counts.get("preemption", 0),
        "failures": counts.get("failure", 0),
        "completed": counts.get("completed", 0),
        "stepsLost": {"total": sum(lost_by_cause.values()), "byCause": lost_by_cause,
                      "byReason": lost_by_reason},
        "timeToResume": {"count": len(ttr), "p50": percentile(ttr, 50),
                         "p95": percentile(ttr, 95)},
        "gpuHours": {"paid": round(paid, 4), "trained": round(trained, 4),
                     "preemptionCost": round(cost, 4)},
        "goodput": round(trained / paid, 4) if paid > 0 else None,
        # the ended attempts' image pulls (the status's imagePull, kept in the end record)
        "imagePulls": {"pulled": len(pulled), "present": sum(1 for p in pulls if p.get("present")),
                       "p50": percentile(pulled, 50), "p95": percentile(pulled, 95)},
        "disruptions": [r for r in rows if r["cause"] != "completed"],
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def render_text(doc: Mapping[str, Any]) -> str:
    """The report for people (lines of at most 100 columns)."""
    lines = [f"PhoenixJob {doc['job']}: {doc['attempts']} attempts ended - "
             f"{doc['preemptions']} preemptions, {doc['failures']} failures, "
             f"{doc['completed']} completed"]
    if doc["disruptions"]:
        lines.append(f"  {'phase':<10} {'attempt':>7} {'cause':<10} {'reason':<22} "
                     f"{'last step':>9} {'resumed':>7} {'lost':>5} {'back after':>10}")
        for r in doc["disruptions"]:
            nxt = "-" if r["resumedFrom"] is None else str(r["resumedFrom"])
            lines.append(
                f"  {r['phase'][:10]:<10} {r['attempt']:>7} {(r['cause'] or '-')[:10]:<10} "
                f"{(r['reason'] or '-')[:22]:<22} {r['lastStep'] if r['lastStep'] is not None else '-':>9} "
                f"{nxt:>7} {r['stepsLost'] if r['stepsLost'] is not None else '-':>5} "
                f"{_s(r['timeToResume']):>10}")
    sl, ttr, gh = doc["stepsLost"], doc["timeToResume"], doc["gpuHours"]
    by = ", ".join(f"{k} {v}" for k, v in sorted(sl["byCause"].items())) or "none"
    lines.append(f"  steps lost:        {sl['total']} ({by})")
    if sl["byReason"]:
        lines.append("    by reason:       " + ", ".join(
            f"{k} {v}" for k, v in sorted(sl["byReason"].items()))[:80])
    lines.append(f"  time to resume:    p50 {_s(ttr['p50'])}, p95 {_s(ttr['p95'])} "
                 f"({ttr['count']} disruptions: an attempt's end to the next one's first step)")
    lines.append(f"  GPU-hours:         paid {gh['paid']:.4f}, trained {gh['trained']:.4f}, "
                 f"cost of preemptions {gh['preemptionCost']:.4f}")
    ip = doc.get("imagePulls") or {}
    if ip.get("pulled") or ip.get("present"):
        lines.append(f"  image pulls:       {ip['pulled']} pulled (p50 {_s(ip['p50'])}, p95 "
                     f"{_s(ip['p95'])}), {ip['present']} already on the node")
    good = doc["goodput"]
    lines.append(f"  goodput:           {'-' if good is None else f'{good:.2f}'} "
                 "(GPU-hours whose steps were kept / GPU-hours paid)")
    return "\n".join(line[:WIDTH] for line in lines) + "\n"
