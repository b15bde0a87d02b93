"""Progress heartbeats: how the operator learns that a Running pod has stopped training.

Kubernetes reports a pod that ends; it does not report one that stays Running while nothing
trains (a collective waiting for a dead rank, a DataLoader worker deadlocked, a socket read
that never returns). Every training process therefore publishes a small JSON object, its
*heartbeat*, in the phase's prefix::

    <prefix>/progress/attempt-<N>/rank-<R>.json

written by a daemon thread every ``PHOENIX_HEARTBEAT_SECONDS`` (default 10 s), whether or not
the loop advanced: the step it last completed, how long ago (``stalledSeconds``, measured on
the process's own monotonic clock, so no clock has to agree with the operator's), rolling
step-time statistics, and, for a gang, the rank's compute time before its first collective
of a step (stragglers). The loop itself only records a time per step boundary (no I/O).

Why an object in storage and not the status port the readiness probe uses: the operator never
needs to reach a pod's network (a NetworkPolicy, a host-network operator or another cluster's
routing may forbid it), the trainer holds no API token, the channel is the one ``control.json``
already uses, and the last heartbeat outlives the pod for the post-mortem (which rank stopped
first). Cost: one PUT of ~400 bytes per rank per interval, off the loop.

The rule both sides apply (``hang_timeout``): an explicit ``recovery.hangTimeoutSeconds``, or
``HANG_MULTIPLE`` times the 95th percentile of the observed step time, never below
``HANG_FLOOR_SECONDS`` (start-up, restore, checkpoints and evaluation between steps stay
under it; the runtime also counts a restore's bytes as progress). The trainer dumps its stacks
when it reaches the timeout (``stackDump`` names the object), so the dump is in storage
before the operator, seeing the same numbers, ends the pod.

Torch-free: the operator imports it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

PROGRESS_DIR = "progress"
HANGS_DIR = "hangs"
ENV_HEARTBEAT_SECONDS = "PHOENIX_HEARTBEAT_SECONDS"
ENV_HANG_TIMEOUT_SECONDS = "PHOENIX_HANG_TIMEOUT_SECONDS"  # the spec's explicit value, if any
ENV_HANG_DETECTION = "PHOENIX_HANG_DETECTION"  # "false": no dumps either

DEFAULT_HEARTBEAT_SECONDS = 10.0
HANG_FLOOR_SECONDS = 180.0
HANG_MULTIPLE = 10.0
# A restore moves no step: it is hung only after this long (or the explicit timeout, if longer).
RESTORE_HANG_SECONDS = 600.0
# After the timeout, how long the operator waits for every live rank's stack dump before it
# ends the pods anyway (a frozen process never writes one).
DUMP_GRACE_SECONDS = 20.0
# A rank is a straggler when its compute time per step is this many times the gang's median
# (and at least STRAGGLER_MIN_EXTRA_SECONDS more), over at least STRAGGLER_MIN_STEPS steps.
STRAGGLER_RATIO = 1.5
STRAGGLER_MIN_EXTRA_SECONDS = 0.05
STRAGGLER_MIN_STEPS = 20

# What the process is doing (``activity``): only "training" and "restoring" are watched.
ACTIVITY_STARTING = "starting"
ACTIVITY_STANDBY = "standby"
ACTIVITY_RESTORING = "restoring"
ACTIVITY_TRAINING = "training"
ACTIVITY_FINISHING = "finishing"
ACTIVITY_REJOINING = "rejoining"  # an in-place gang's survivor waits for its next attempt
WATCHED = (ACTIVITY_RESTORING, ACTIVITY_TRAINING)


def heartbeat_key(attempt: int, rank: int) -> str:
    return f"{PROGRESS_DIR}/attempt-{attempt}/rank-{rank}.json"


def heartbeat_prefix(attempt: int) -> str:
    return f"{PROGRESS_DIR}/attempt-{attempt}"


def dump_key(attempt: int, rank: int) -> str:
    return f"{HANGS_DIR}/attempt-{attempt}/rank-{rank}.txt"


def hang_timeout(explicit: float | None, step_p95: float | None) -> float:
    """Seconds without progress after which a watched process is hung."""
    if explicit:
        return float(explicit)
    observed = HANG_MULTIPLE * step_p95 if step_p95 else 0.0
    return max(HANG_FLOOR_SECONDS, observed)


def watch_timeout(explicit: float | None, step_p95: float | None, activity: str) -> float | None:
    """The timeout for a process doing ``activity``; None: not watched (starting, standby,
    finishing)."""
    if activity not in WATCHED:
        return None
    t = hang_timeout(explicit, step_p95)
    return max(t, RESTORE_HANG_SECONDS) if activity == ACTIVITY_RESTORING else t


@dataclass(frozen=True)
class Heartbeat:
    """One rank's heartbeat (the JSON keys are the camelCase of the fields)."""

    attempt: int
    rank: int
    pod: str = ""
    step: int = 0  # the newest completed step (a step boundary the loop reached)
    activity: str = ACTIVITY_STARTING
    stalled: float = 0.0  # seconds since the last progress, when written
    beat: int = 0  # grows by one per write: a frozen process's stops growing
    steps_timed: int = 0
    step_p50: float | None = None
    step_p95: float | None = None
    compute_p50: float | None = None  # a gang rank's time before its first collective
    in_collective: bool = False  # this step's first collective was entered (it waits on peers)
    hang_timeout: float | None = None  # the rule's value, as this process computed it
    stack_dump: str = ""  # key of this process's stack dump, once it wrote one
    pid: int = 0
    interval: float = DEFAULT_HEARTBEAT_SECONDS  # this process's seconds between writes
    last_progress_at: float = 0.0  # unix time of the last progress (for people; not compared)
    # Where this process's state came from: "peers" (an in-place gang's survivors), "checkpoint"
    # or "none"; the step; unix time of its first completed step after that (best effort).
    restored_from: str = ""
    restored_step: int | None = None
    training_since: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        d = {_camel(k): v for k, v in asdict(self).items()
             if not (v is None or v is False or v == "" or v == {})}
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Heartbeat":
        d = json.loads(raw)
        if not isinstance(d, dict) or "attempt" not in d or "rank" not in d:
            raise ValueError("not a heartbeat: needs attempt and rank")

        def num(key: str) -> float | None:
            v = d.get(key)
            return float(v) if isinstance(v, (int, float)) else None

        return cls(attempt=int(d["attempt"]), rank=int(d["rank"]), pod=str(d.get("pod", "")),
                   step=int(d.get("step", 0)), activity=str(d.get("activity", ACTIVITY_STARTING)),
                   stalled=float(d.get("stalled", 0.0)), beat=int(d.get("beat", 0)),
                   steps_timed=int(d.get("stepsTimed", 0)), step_p50=num("stepP50"),
                   step_p95=num("stepP95"), compute_p50=num("computeP50"),
                   in_collective=bool(d.get("inCollective", False)),
                   hang_timeout=num("hangTimeout"), stack_dump=str(d.get("stackDump", "")),
                   pid=int(d.get("pid", 0)),
                   interval=float(d.get("interval", DEFAULT_HEARTBEAT_SECONDS)),
                   last_progress_at=float(d.get("lastProgressAt", 0.0)),
                   restored_from=str(d.get("restoredFrom", "")),
                   restored_step=int(d["restoredStep"]) if isinstance(d.get("restoredStep"), int) else None,
                   training_since=num("trainingSince"), extra=dict(d.get("extra") or {}))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def stragglers(compute: Mapping[int, float], steps: Mapping[int, int]) -> list[int]:
    """Ranks whose compute time per step is persistently above the gang's: at least
    ``STRAGGLER_RATIO`` times the median of the others and ``STRAGGLER_MIN_EXTRA_SECONDS``
    more, each with ``STRAGGLER_MIN_STEPS`` steps timed. Needs 2 ranks or more."""
    timed = {r: c for r, c in compute.items() if steps.get(r, 0) >= STRAGGLER_MIN_STEPS}
    if len(timed) < 2:
        return []
    out = []
    for rank, c in sorted(timed.items()):
        others = sorted(v for r, v in timed.items() if r != rank)
        mid = others[len(others) // 2] if len(others) % 2 else (
            others[len(others) // 2 - 1] + others[len(others) // 2]) / 2
        if c >= STRAGGLER_RATIO * mid and c - mid >= STRAGGLER_MIN_EXTRA_SECONDS:
            out.append(rank)
    return out
