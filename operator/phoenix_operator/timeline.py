"""``phoenixctl timeline``: a job's life as a picture - one lane per phase (and per gang
member), each attempt a bar drawn by how it ended, with the reclaim notices, handoffs,
checkpoints, steps lost and the standby - in the terminal (Unicode, at most ``WIDTH``
columns) or, with matplotlib installed (the ``timeline`` extra), as a PNG or SVG.

``build`` turns history records and attempt logs into ``Lane``s (pure); ``render_text``
draws them as text (pure); ``render_image`` draws them with matplotlib.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from . import history
from .history import Record, parse_time

WIDTH = 100
LABEL = 14  # columns for the lane's name
# How an attempt ended -> (bar fill, end mark). One column each (no emoji: they take two).
FILL = {"completed": "█", "preemption": "▓", "failure": "▒", None: "▶"}
MARK = {"completed": "✓", "preemption": "↯", "failure": "✗", None: "▶"}
STANDBY, NOTICE, HANDOFF, CHECKPOINT = "░", "!", "⇄", "┴"
COLORS = {"completed": "#2e7d32", "preemption": "#f9a825", "failure": "#c62828",
          None: "#1565c0", "standby": "#b0bec5"}
INSTALL_HINT = "pip install 'phoenix-jobs[timeline]' (matplotlib)"


@dataclass
class Bar:
    attempt: int
    start: datetime
    end: datetime | None  # None: still running
    cause: str | None  # None: still running
    reason: str = ""
    steps_lost: int | None = None
    resumed_from: int | None = None
    last_step: int | None = None
    node: str | None = None
    promoted: bool = False
    spare: bool = False  # an in-place gang's spare took the lost member's place
    culprit: bool = True  # a gang lane: this member ended the attempt


@dataclass
class Lane:
    name: str
    bars: list[Bar] = field(default_factory=list)
    standbys: list[tuple[datetime, datetime | None]] = field(default_factory=list)
    notices: list[datetime] = field(default_factory=list)
    handoffs: list[datetime] = field(default_factory=list)
    checkpoints: list[datetime] = field(default_factory=list)


def _member_lanes(members: int) -> list[int | None]:
    return list(range(members)) if members > 1 else [None]


def build(records: Sequence[Record], logs: Mapping[str, Mapping[int, Iterable[Mapping[str, Any]]]]
          | None = None, now: datetime | None = None) -> list[Lane]:
    """Lanes from history records; ``logs`` (phase -> attempt -> attempt-log events) add the
    checkpoints and the live attempt's progress."""
    logs = logs or {}
    lanes: list[Lane] = []
    for phase in history.phases(records):
        rows = {r["attempt"]: r for r in history.disruptions(records, phase)}
        by_attempt = history.attempts(records, phase)
        members = max([int(k.get("start", {}).get("members") or 1) for k in by_attempt.values()]
                      + [int(k.get("end", {}).get("members") or 1) for k in by_attempt.values()])
        phase_lanes = [Lane(phase if m is None else f"{phase}/{m}") for m in _member_lanes(members)]
        # an in-place gang's spare waits under its own reserved number and takes a place
        # under the replacement's: its standby lane ends at that start, found by its pod
        spare_took = {r.get("pod"): parse_time(r.get("time")) for r in records
                      if r.get("kind") == "start" and r.get("phase") == phase and r.get("spare")}
        for attempt, kinds in by_attempt.items():
            start, end = kinds.get("start"), kinds.get("end")
            # A promoted standby's (or a spare's) bar starts when it took over (before: the
            # standby lane).
            took_over = bool(start and (start.get("promoted") or start.get("spare")))
            promoted_at = parse_time(start.get("time")) if took_over else None
            if "standby" in kinds:  # also a spare's number, which never starts an attempt
                t = parse_time(kinds["standby"].get("time"))
                promoted = promoted_at or spare_took.get(kinds["standby"].get("pod"))
                if t and (start or end or promoted):
                    for lane in phase_lanes:
                        lane.standbys.append((t, promoted or (end and parse_time(end.get("time")))
                                              or None))
            t0 = (promoted_at or parse_time((end or {}).get("created"))
                  or parse_time((start or {}).get("time")))
            if t0 is None:
                continue
            row = rows.get(attempt, {})
            culprit = (end or {}).get("pod") or ""
            for m, lane in zip(_member_lanes(members), phase_lanes):
                lane.bars.append(Bar(
                    attempt=attempt, start=t0, end=parse_time((end or {}).get("time")) or None,
                    cause=(end or {}).get("cause"), reason=(end or {}).get("reason") or "",
                    steps_lost=row.get("stepsLost"), resumed_from=(start or {}).get("resumeStep"),
                    last_step=(end or {}).get("lastStep"), node=(end or {}).get("node"),
                    promoted=bool((start or {}).get("promoted")),
                    spare=bool((start or {}).get("spare")),
                    culprit=m is None or culprit.rsplit(".", 1)[-1].split(" ")[0] == str(m)))
            events = list(logs.get(phase, {}).get(attempt, ()))
            for e in events:
                if e.get("event") == "checkpoint" and parse_time(e.get("time")):
                    phase_lanes[0].checkpoints.append(parse_time(e["time"]))
            for r in records:
                if r.get("phase") == phase and r.get("attempt") == attempt and parse_time(r.get("time")):
                    if r["kind"] == "notice":
                        phase_lanes[0].notices.append(parse_time(r["time"]))
                    elif r["kind"] == "handoff":
                        phase_lanes[0].handoffs.append(parse_time(r["time"]))
        for lane in phase_lanes:
            lane.bars.sort(key=lambda b: b.start)
        lanes += phase_lanes
    return lanes


def span(lanes: Sequence[Lane], now: datetime | None) -> tuple[datetime, datetime] | None:
    times = [t for lane in lanes for b in lane.bars for t in (b.start, b.end) if t]
    times += [t for lane in lanes for t in lane.notices + lane.handoffs + lane.checkpoints]
    if now is not None and any(b.end is None for lane in lanes for b in lane.bars):
        times.append(now)
    if not times:
        return None
    return min(times), max(times)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def render_text(title: str, lanes: Sequence[Lane], now: datetime | None = None,
                width: int = WIDTH) -> str:
    """The timeline as text: each line at most ``width`` columns."""
    sp = span(lanes, now)
    if sp is None:
        return f"{title}: no attempts recorded yet\n"
    t0, t1 = sp
    cols = width - LABEL - 2
    total = max((t1 - t0).total_seconds(), 1e-6)

    def col(t: datetime) -> int:
        return min(cols - 1, max(0, int((t - t0).total_seconds() / total * cols)))

    out = [f"{title}"[:width],
           f"{t0:%Y-%m-%d %H:%M:%S} .. {t1:%H:%M:%S} UTC ({_duration(total)}; one column "
           f"{_duration(total / cols) if total / cols >= 1 else f'{total / cols:.2f}s'})"[:width]]
    for lane in lanes:
        cells = [" "] * cols
        for bar in lane.bars:
            fill = FILL.get(bar.cause, FILL[None])
            for c in range(col(bar.start), col(bar.end or (now or t1)) + 1):
                cells[c] = fill
        for bar in lane.bars:  # the end marks last: a short next bar must not hide them
            if bar.cause is None or bar.culprit:
                cells[col(bar.end or (now or t1))] = MARK.get(bar.cause, MARK[None])
        marks = [" "] * cols
        for t in lane.checkpoints:
            marks[col(t)] = CHECKPOINT
        for t in lane.notices:
            marks[col(t)] = NOTICE
        for t in lane.handoffs:
            marks[col(t)] = HANDOFF
        out.append(f"{lane.name[:LABEL]:<{LABEL}}│" + "".join(cells) + "│")
        if lane.standbys:  # its own row: the standby waits beside the attempt it replaces
            waiting = [" "] * cols
            for a, b in lane.standbys:
                for c in range(col(a), col(b or t1) + 1):
                    waiting[c] = STANDBY
            out.append(f"{'  standby':<{LABEL}}│" + "".join(waiting) + "│")
        if any(m != " " for m in marks):
            out.append(" " * LABEL + "╵" + "".join(marks) + "╵")
    out.append(f"{FILL['completed']} completed {FILL['preemption']} preempted "
               f"{FILL['failure']} failed {FILL[None]} running {STANDBY} standby "
               f"{MARK['preemption']}{MARK['failure']}{MARK['completed']} its end "
               f"{CHECKPOINT} checkpoint {NOTICE} notice {HANDOFF} handoff"[:width])
    for lane in lanes:
        for bar in lane.bars:
            if "/" in lane.name and not lane.name.endswith("/0"):
                continue  # a gang: its attempts once, under member 0
            ended = bar.cause or "running"
            text = f"  {lane.name.split('/')[0]} #{bar.attempt} {ended}"
            if bar.reason:
                text += f" ({bar.reason})"
            if bar.node:
                text += f" on {bar.node}"
            if bar.promoted:
                text += ", was the standby"
            elif bar.spare:
                text += ", the spare took the place"
            if bar.steps_lost is not None and bar.cause not in (None, "completed"):
                text += f"; {bar.steps_lost} steps lost"
            if bar.end is not None:
                text += f"; ran {_duration((bar.end - bar.start).total_seconds())}"
            out.append(text[:width])
    return "\n".join(out) + "\n"


def render_image(title: str, lanes: Sequence[Lane], path: str, now: datetime | None = None) -> None:
    """Write the timeline as a picture (PNG or SVG by ``path``'s suffix). Needs matplotlib
    (``ImportError`` otherwise: the CLI says how to install it)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    sp = span(lanes, now)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.8 * max(1, len(lanes))))
    ax.set_title(title, loc="left", fontsize=11)
    if sp is None:
        ax.text(0.5, 0.5, "no attempts recorded yet", ha="center", transform=ax.transAxes)
    else:
        t0, t1 = sp

        def x(t: datetime) -> float:
            return (t - t0).total_seconds()

        for i, lane in enumerate(lanes):
            y = len(lanes) - 1 - i
            for a, b in lane.standbys:
                ax.broken_barh([(x(a), x(b or t1) - x(a))], (y + 0.3, 0.1),
                               facecolors=COLORS["standby"])
            for bar in lane.bars:
                end = bar.end or now or t1
                ax.broken_barh([(x(bar.start), max(x(end) - x(bar.start), 0.5))], (y - 0.3, 0.6),
                               facecolors=COLORS.get(bar.cause, COLORS[None]),
                               edgecolors="black", linewidth=0.5)
                label = f"#{bar.attempt}"
                if bar.steps_lost and bar.cause not in (None, "completed") and bar.culprit:
                    label += f"\n-{bar.steps_lost}"  # steps lost (the x label says so)
                ax.text(x(bar.start) + 0.5, y, label, va="center", fontsize=7)
            for t in lane.checkpoints:
                ax.plot([x(t)], [y - 0.38], marker="|", color="black", markersize=5)
            for t in lane.notices:
                ax.plot([x(t)], [y + 0.42], marker="v", color="#e65100", markersize=7)
            for t in lane.handoffs:
                ax.plot([x(t)], [y + 0.42], marker="D", color="#6a1b9a", markersize=5)
        ax.set_xlim(0, max(x(t1), 1.0) * 1.01)
        ax.set_xlabel(f"seconds since {t0:%Y-%m-%d %H:%M:%S} UTC   (#attempt, -steps lost; "
                      "ticks: checkpoints; ▼ notice, ◆ handoff)")
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([lane.name for lane in reversed(lanes)])
    ax.legend(handles=[Patch(color=COLORS["completed"], label="completed"),
                       Patch(color=COLORS["preemption"], label="preempted"),
                       Patch(color=COLORS["failure"], label="failed"),
                       Patch(color=COLORS[None], label="running"),
                       Patch(color=COLORS["standby"], label="standby")],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
