"""Typed views of a PhoenixJob: the spec (parsed once per reconcile) and the status.

Pure data: no API calls, no clock. Defaults here mirror the CRD's, so a body that did not
pass through the API server (unit tests, `phoenixctl status` on an old object) means the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, NamedTuple

from phoenix_trainer.core.contract import ADDRESSING_AUTO

from .constants import DEFAULT_CA_BUNDLE_KEY, PhaseState


def _ts(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def ts(value: datetime | None) -> str | None:
    """RFC 3339 in UTC, second precision, as Kubernetes writes it."""
    if value is None:
        return None
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


parse_ts = _ts


def bounded(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters ("..." marks the cut): for every string copied into
    the status from outside (storage, a termination message), whose CRD field has a maxLength."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    args: tuple[str, ...] | None = None
    env: tuple[Mapping[str, Any], ...] = ()
    depends_on: tuple[str, ...] = ()
    independent: bool = False
    replicas: int = 1  # pods in the gang (one torchrun node each)
    nproc_per_node: int | None = None  # torchrun processes per pod; None: the pod's GPUs, else 1


class CABundle(NamedTuple):
    """``spec.checkpoint.caBundle``: where the trainer's PEM bundle comes from."""

    source: str  # "configMap" or "secret"
    name: str
    key: str


@dataclass(frozen=True)
class CheckpointSpec:
    uri: str
    endpoint: str | None = None
    region: str | None = None
    credentials_secret: str | None = None
    addressing_style: str = ADDRESSING_AUTO  # auto|path|virtual (contract.s3_addressing_style)
    ca_bundle: CABundle | None = None  # a private CA for the trainer (spec.checkpoint.caBundle)
    keep: int = 3
    interval_steps: int | None = None
    interval_seconds: int | None = None

    def phase_uri(self, phase: str) -> str:
        return f"{self.uri.rstrip('/')}/{phase}"


@dataclass(frozen=True)
class RecoverySpec:
    max_preemptions: int | None = None  # None: unlimited
    max_failures: int = 3
    fallback_after: int = 2
    backoff_initial: float = 10.0
    backoff_max: float = 300.0
    grace_seconds: int = 30
    gang_schedule_timeout: float = 300.0  # a gang not all scheduled by then is released
    standby: bool = False  # keep a warm standby pod per running phase (single-pod phases)
    on_notice: str = "Handoff"  # Handoff | Checkpoint | Ignore: what a node's notice starts
    hang_detection: bool = True  # end an attempt that makes no progress (core.heartbeat)
    hang_timeout: float | None = None  # explicit; None: the rule's default from step times
    # A gang that loses members: Whole - every member restarts (from the newest checkpoint);
    # Member - only the lost members are replaced, the survivors keep their pods and state.
    gang_restart: str = "Whole"
    # Ignore | Replace: a straggler's member is moved to another node (gangRestart Member)
    on_straggler: str = "Ignore"

    def backoff(self, failures: int) -> float:
        """Delay before the replacement after the ``failures``-th failure (1-based)."""
        if failures <= 0:
            return 0.0
        return float(min(self.backoff_max, self.backoff_initial * (2 ** (failures - 1))))


def _ca_bundle(raw: Mapping[str, Any] | None) -> CABundle | None:
    # the CRD admits exactly one of configMap and secret
    for source in ("configMap", "secret"):
        if raw and raw.get(source):
            return CABundle(source, str(raw[source]), str(raw.get("key") or DEFAULT_CA_BUNDLE_KEY))
    return None


@dataclass(frozen=True)
class JobSpec:
    template: Mapping[str, Any]
    phases: tuple[PhaseSpec, ...]
    checkpoint: CheckpointSpec
    recovery: RecoverySpec = RecoverySpec()
    suspend: bool = False

    def phase(self, name: str) -> PhaseSpec:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> "JobSpec":
        phases = []
        for i, raw in enumerate(spec.get("phases") or []):
            if "dependsOn" in raw and raw["dependsOn"] is not None:
                deps = tuple(raw["dependsOn"])
            else:
                deps = (spec["phases"][i - 1]["name"],) if i > 0 else ()
            args = raw.get("args")
            phases.append(PhaseSpec(
                name=raw["name"], args=tuple(args) if args is not None else None,
                env=tuple(raw.get("env") or ()), depends_on=deps,
                independent=bool(raw.get("independent", False)),
                replicas=int(raw.get("replicas", 1)),
                nproc_per_node=int(raw["nprocPerNode"]) if raw.get("nprocPerNode") else None,
            ))
        ck = spec.get("checkpoint") or {}
        rec = spec.get("recovery") or {}
        bo = rec.get("backoff") or {}
        max_pre = rec.get("maxPreemptions")
        return cls(
            template=spec.get("template") or {},
            phases=tuple(phases),
            checkpoint=CheckpointSpec(
                uri=ck.get("uri", ""), endpoint=ck.get("endpoint"), region=ck.get("region"),
                credentials_secret=ck.get("credentialsSecret"),
                addressing_style=str(ck.get("addressingStyle") or ADDRESSING_AUTO),
                ca_bundle=_ca_bundle(ck.get("caBundle")),
                keep=int(ck.get("keep", 3)),
                interval_steps=ck.get("intervalSteps"), interval_seconds=ck.get("intervalSeconds"),
            ),
            recovery=RecoverySpec(
                max_preemptions=int(max_pre) if max_pre is not None else None,
                max_failures=int(rec.get("maxFailures", 3)),
                fallback_after=int(rec.get("fallbackAfter", 2)),
                backoff_initial=float(bo.get("initialSeconds", 10)),
                backoff_max=float(bo.get("maxSeconds", 300)),
                grace_seconds=int(rec.get("terminationGracePeriodSeconds", 30)),
                gang_schedule_timeout=float(rec.get("gangScheduleTimeoutSeconds", 300)),
                standby=bool(rec.get("standby", False)),
                on_notice=str(rec.get("onNotice") or "Handoff"),
                hang_detection=bool(rec.get("hangDetection", True)),
                hang_timeout=float(rec["hangTimeoutSeconds"]) if rec.get("hangTimeoutSeconds") else None,
                gang_restart=str(rec.get("gangRestart") or "Whole"),
                on_straggler=str(rec.get("onStraggler") or "Ignore"),
            ),
            suspend=bool(spec.get("suspend", False)),
        )


@dataclass(frozen=True)
class Failure:
    """How an unsuccessful attempt ended (``status.phases[].lastFailure``)."""

    cause: str
    reason: str
    exit_code: int | None
    message: str
    time: datetime
    attempt: int
    pod: str | None = None  # the pod that ended the attempt (a gang: the member that caused it)

    def to_dict(self) -> dict:
        d = {"cause": self.cause, "reason": self.reason, "message": self.message,
             "time": ts(self.time), "attempt": self.attempt}
        if self.exit_code is not None:
            d["exitCode"] = self.exit_code
        if self.pod:
            d["pod"] = self.pod
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Failure | None":
        if not d:
            return None
        return cls(cause=d.get("cause", ""), reason=d.get("reason", ""),
                   exit_code=d.get("exitCode"), message=d.get("message", ""),
                   time=_ts(d.get("time")) or datetime.fromtimestamp(0, timezone.utc),
                   attempt=int(d.get("attempt", 0)), pod=d.get("pod"))


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint the operator knows of (``status.phases[].lastCheckpoint``)."""

    uri: str
    step: int
    epoch: int | None = None
    time: datetime | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"uri": self.uri, "step": self.step}
        if self.epoch is not None:
            d["epoch"] = self.epoch
        if self.time is not None:
            d["time"] = ts(self.time)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "CheckpointRef | None":
        if not d or "uri" not in d:
            return None
        return cls(uri=d["uri"], step=int(d.get("step", 0)), epoch=d.get("epoch"),
                   time=_ts(d.get("time")))


@dataclass(frozen=True)
class StandbyRef:
    """``status.phases[].standby``: the pod started ahead of need to take over the phase; for
    a gang, the standby gang, named by its member 0 (``pod``, ``podUID``, ``node``)."""

    pod: str
    attempt: int
    # "standby" (recovery.standby) | "notice" (started for a node's notice) | "spare" (an
    # in-place gang's spare member: one pod, takes a lost member's place)
    reason: str
    since: datetime
    pod_uid: str | None = None  # member 0's, once every member is seen
    node: str | None = None
    ready: bool = False  # a gang: every member Ready
    members: int = 1
    ready_members: int = 0

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"pod": self.pod, "attempt": self.attempt, "reason": self.reason,
                             "since": ts(self.since), "ready": self.ready}
        if self.pod_uid:
            d["podUID"] = self.pod_uid
        if self.node:
            d["node"] = self.node
        if self.members > 1:
            d["members"] = self.members
            d["readyMembers"] = self.ready_members
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "StandbyRef | None":
        if not d or "pod" not in d:
            return None
        return cls(pod=d["pod"], attempt=int(d.get("attempt", 0)), reason=d.get("reason", ""),
                   since=_ts(d.get("since")) or datetime.fromtimestamp(0, timezone.utc),
                   pod_uid=d.get("podUID"), node=d.get("node"), ready=bool(d.get("ready")),
                   members=int(d.get("members", 1)), ready_members=int(d.get("readyMembers", 0)))


@dataclass(frozen=True)
class Notice:
    """``status.phases[].lastNotice``: a node's announcement that it will be reclaimed."""

    node: str
    signal: str  # e.g. "taint karpenter.sh/disrupted"
    time: datetime
    attempt: int  # the attempt whose node it was
    handoff_to: int | None = None  # the standby attempt asked to take over, once asked

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"node": self.node, "signal": self.signal, "time": ts(self.time),
                             "attempt": self.attempt}
        if self.handoff_to is not None:
            d["handoffTo"] = self.handoff_to
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Notice | None":
        if not d or "node" not in d:
            return None
        to = d.get("handoffTo")
        return cls(node=d["node"], signal=d.get("signal", ""),
                   time=_ts(d.get("time")) or datetime.fromtimestamp(0, timezone.utc),
                   attempt=int(d.get("attempt", 0)), handoff_to=int(to) if to is not None else None)


@dataclass(frozen=True)
class Straggler:
    """A gang rank whose compute time per step is persistently above the others'."""

    rank: int
    pod: str
    node: str
    compute_seconds: float
    others_seconds: float  # the median of the other ranks'

    def describe(self) -> str:
        return (f"rank {self.rank} (pod {self.pod} on node {self.node or '?'}) computes "
                f"{self.compute_seconds:.3f}s per step before its first collective, the other "
                f"ranks {self.others_seconds:.3f}s")

    def to_dict(self) -> dict:
        return {"rank": self.rank, "pod": self.pod, "node": self.node,
                "computeSeconds": round(self.compute_seconds, 4),
                "othersSeconds": round(self.others_seconds, 4)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Straggler":
        return cls(rank=int(d.get("rank", 0)), pod=str(d.get("pod", "")),
                   node=str(d.get("node", "")), compute_seconds=float(d.get("computeSeconds", 0)),
                   others_seconds=float(d.get("othersSeconds", 0)))


@dataclass(frozen=True)
class ProgressRef:
    """``status.phases[].progress``: the running attempt's training progress, from its
    heartbeats (``core.heartbeat``); refreshed about every ``PROGRESS_REFRESH_SECONDS``."""

    attempt: int
    step: int
    last_step_time: datetime  # when the slowest rank last completed a step (operator's clock)
    hang_timeout: float | None = None  # seconds without a step before the attempt is Hung
    step_seconds: float | None = None  # median step time of the slowest rank
    stragglers: tuple[Straggler, ...] = ()

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"attempt": self.attempt, "step": self.step,
                             "lastStepTime": ts(self.last_step_time)}
        if self.hang_timeout is not None:
            d["hangTimeoutSeconds"] = round(self.hang_timeout, 1)
        if self.step_seconds is not None:
            d["stepSeconds"] = round(self.step_seconds, 4)
        if self.stragglers:
            d["stragglers"] = [s.to_dict() for s in self.stragglers]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ProgressRef | None":
        if not d or "lastStepTime" not in d:
            return None
        return cls(attempt=int(d.get("attempt", 0)), step=int(d.get("step", 0)),
                   last_step_time=_ts(d.get("lastStepTime")) or datetime.fromtimestamp(0, timezone.utc),
                   hang_timeout=d.get("hangTimeoutSeconds"), step_seconds=d.get("stepSeconds"),
                   stragglers=tuple(Straggler.from_dict(s) for s in d.get("stragglers") or ()
                                    if isinstance(s, Mapping)))


@dataclass(frozen=True)
class Hang:
    """``status.phases[].lastHang``: an attempt the operator ended because it made no
    progress; ``rank``/``pod``: the one that stopped first; ``stackDumps``: URIs."""

    attempt: int
    time: datetime
    step: int
    stalled_seconds: float
    timeout_seconds: float
    rank: int
    pod: str
    stack_dumps: tuple[str, ...] = ()

    def describe(self) -> str:
        dumps = f"; stack dumps: {', '.join(self.stack_dumps)}" if self.stack_dumps else "; no stack dump"
        return (f"no step for {self.stalled_seconds:.0f}s (hang timeout {self.timeout_seconds:.0f}s) "
                f"after step {self.step}; rank {self.rank} (pod {self.pod}) stopped first{dumps}")

    def to_dict(self) -> dict:
        return {"attempt": self.attempt, "time": ts(self.time), "step": self.step,
                "stalledSeconds": round(self.stalled_seconds, 1),
                "timeoutSeconds": round(self.timeout_seconds, 1), "rank": self.rank,
                "pod": self.pod, "stackDumps": list(self.stack_dumps)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Hang | None":
        if not d or "attempt" not in d:
            return None
        return cls(attempt=int(d["attempt"]),
                   time=_ts(d.get("time")) or datetime.fromtimestamp(0, timezone.utc),
                   step=int(d.get("step", 0)), stalled_seconds=float(d.get("stalledSeconds", 0)),
                   timeout_seconds=float(d.get("timeoutSeconds", 0)), rank=int(d.get("rank", 0)),
                   pod=str(d.get("pod", "")), stack_dumps=tuple(d.get("stackDumps") or ()))


@dataclass(frozen=True)
class Move:
    """``status.phases[].lastMove``: a straggler's gang member the operator moved off its
    node (``recovery.onStraggler: Replace``): its pod was stopped and replaced in place on
    another node. Counted in ``stragglerMoves``, not as a preemption."""

    attempt: int  # the attempt whose member was moved
    time: datetime
    member: int
    rank: int
    pod: str
    node: str
    why: str = ""

    def to_dict(self) -> dict:
        return {"attempt": self.attempt, "time": ts(self.time), "member": self.member,
                "rank": self.rank, "pod": self.pod, "node": self.node, "why": self.why}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Move | None":
        if not d or "attempt" not in d:
            return None
        return cls(attempt=int(d["attempt"]),
                   time=_ts(d.get("time")) or datetime.fromtimestamp(0, timezone.utc),
                   member=int(d.get("member", 0)), rank=int(d.get("rank", 0)),
                   pod=str(d.get("pod", "")), node=str(d.get("node", "")),
                   why=str(d.get("why", "")))


@dataclass(frozen=True)
class Replacement:
    """``status.phases[].lastReplacement``: gang members replaced in place
    (``recovery.gangRestart: Member``) while the others kept running: which members, their
    lost pods and the pods that replaced them, the attempt the gang became, and why."""

    attempt: int  # the attempt the gang became (its fence)
    time: datetime
    members: tuple[int, ...]
    lost: tuple[str, ...]  # the lost members' pods
    pods: tuple[str, ...]  # the pods replacing them
    cause: str
    reason: str
    spare: str = ""  # the spare pod that took a place (it is among ``pods``), if one did
    # From the trainers' heartbeats once they train again: where the state came from
    # (peers | checkpoint), the step they resumed at, and seconds from the loss until every
    # rank completed a step.
    recovered_from: str = ""
    resumed_step: int | None = None
    training_again_seconds: float | None = None

    def describe(self) -> str:
        what = ", ".join(f"member {m} ({lost} -> {'spare ' if new == self.spare else ''}{new})"
                         for m, lost, new in zip(self.members, self.lost, self.pods))
        return f"{what}: {self.reason} ({self.cause}); the gang continues as attempt {self.attempt}"

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"attempt": self.attempt, "time": ts(self.time),
                             "members": list(self.members), "lostPods": list(self.lost),
                             "pods": list(self.pods), "cause": self.cause, "reason": self.reason}
        if self.spare:
            d["spare"] = self.spare
        if self.recovered_from:
            d["recoveredFrom"] = self.recovered_from
        if self.resumed_step is not None:
            d["resumedStep"] = self.resumed_step
        if self.training_again_seconds is not None:
            d["trainingAgainSeconds"] = round(self.training_again_seconds, 1)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Replacement | None":
        if not d or "attempt" not in d:
            return None
        return cls(attempt=int(d["attempt"]),
                   time=_ts(d.get("time")) or datetime.fromtimestamp(0, timezone.utc),
                   members=tuple(int(m) for m in d.get("members") or ()),
                   lost=tuple(str(p) for p in d.get("lostPods") or ()),
                   pods=tuple(str(p) for p in d.get("pods") or ()),
                   cause=str(d.get("cause", "")), reason=str(d.get("reason", "")),
                   spare=str(d.get("spare") or ""),
                   recovered_from=str(d.get("recoveredFrom") or ""),
                   resumed_step=int(d["resumedStep"]) if d.get("resumedStep") is not None else None,
                   training_again_seconds=(float(d["trainingAgainSeconds"])
                                           if d.get("trainingAgainSeconds") is not None else None))


@dataclass(frozen=True)
class ImagePull:
    """``status.phases[].imagePull``: how the current attempt's pod got its trainer image
    (``image_pull`` reads it from the kubelet's ``Pulled`` event).
    ``present``: it was already on the node (no pull); else ``seconds`` the pull took,
    ``waiting_seconds`` with the wait for the kubelet's pull queue, ``bytes`` the image's
    size as the runtime reports it (containerd: its stored, compressed blobs)."""

    attempt: int
    pod: str
    image: str
    present: bool
    seconds: float | None = None
    waiting_seconds: float | None = None
    bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"attempt": self.attempt, "pod": self.pod, "image": self.image,
                             "present": self.present}
        for key, value in (("seconds", self.seconds), ("includingWaitingSeconds",
                           self.waiting_seconds), ("bytes", self.bytes)):
            if value is not None:
                d[key] = round(value, 3) if isinstance(value, float) else value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ImagePull | None":
        if not d or d.get("attempt") is None:
            return None
        return cls(attempt=int(d["attempt"]), pod=str(d.get("pod") or ""),
                   image=str(d.get("image") or ""), present=bool(d.get("present")),
                   seconds=d.get("seconds"), waiting_seconds=d.get("includingWaitingSeconds"),
                   bytes=d.get("bytes"))

    def describe(self) -> str:
        if self.present:
            return "image already on the node"
        size = f", {self.bytes / 2**30:.2f} GiB" if self.bytes else ""
        return f"image pulled in {self.seconds:.1f}s{size}"


@dataclass(frozen=True)
class PhaseStatus:
    """``status.phases[]``: everything the operator must remember about one phase.

    Together with the list of pods (by label) this is the operator's whole state: after a
    restart it is rebuilt from here, never from memory.
    """

    name: str
    state: PhaseState = PhaseState.PENDING
    attempts: int = 0
    preemptions: int = 0
    failures: int = 0
    consecutive_failures_at_checkpoint: int = 0
    skipped_steps: tuple[int, ...] = ()
    pod: str | None = None
    pod_uid: str | None = None  # set once the pod is seen: "created" vs "not created yet"
    resume_from: str | None = None
    next_attempt_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    last_failure: Failure | None = None
    last_checkpoint: CheckpointRef | None = None
    # What the trainer last said about exact resume (None: it has not said yet).
    resume_exact: bool | None = None
    resume_exact_reason: str = ""
    standby: StandbyRef | None = None
    notices: int = 0
    last_notice: Notice | None = None
    promotions: int = 0  # standbys that took over
    last_attempt: int = 0  # the highest attempt number given out (standbys included)
    standby_retry_at: datetime | None = None  # a standby gang released: no new one before
    # Attempts in a row that ended before their trainer ran (refused, evicted while
    # Pending): bounded by MAX_UNSTARTED_PREEMPTIONS, reset by an attempt that ran.
    unstarted_preemptions: int = 0
    # Standbys of the current attempt that failed in a row (none became ready between):
    # retried with backoff (standby_retry_at), none kept after MAX_STANDBY_FAILURES.
    standby_failures: int = 0
    progress: ProgressRef | None = None
    hangs: int = 0  # attempts ended as Hung (charged to the failure budget)
    last_hang: Hang | None = None
    # A gang replaced in place (gangRestart: Member): the attempt whose pod serves each
    # member (empty: every member is the current attempt's), and the replacements so far.
    members: tuple[int, ...] = ()
    # ... and which of them a former spare serves (its pod: ``podspec.spare_pod_name`` of
    # the member's attempt in ``members``).
    spare_members: tuple[int, ...] = ()
    replacements: int = 0
    last_replacement: Replacement | None = None
    straggler_moves: int = 0  # members moved off a slow node (onStraggler: Replace)
    last_move: Move | None = None
    image_pull: ImagePull | None = None  # the current (or last) attempt's pod's image pull

    def member_attempt(self, member: int) -> int:
        """The attempt whose pod serves ``member`` of the current gang."""
        return self.members[member] if member < len(self.members) else self.attempts

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "name": self.name, "state": self.state.value, "attempts": self.attempts,
            "preemptions": self.preemptions, "failures": self.failures,
            "consecutiveFailuresAtCheckpoint": self.consecutive_failures_at_checkpoint,
            "skippedSteps": list(self.skipped_steps),
        }
        for key, value in (("pod", self.pod), ("podUID", self.pod_uid),
                           ("resumeFrom", self.resume_from),
                           ("nextAttemptAt", ts(self.next_attempt_at)),
                           ("startedAt", ts(self.started_at)),
                           ("completedAt", ts(self.completed_at)),
                           ("standbyRetryAt", ts(self.standby_retry_at))):
            if value is not None:
                d[key] = value
        if self.last_failure:
            d["lastFailure"] = self.last_failure.to_dict()
        if self.last_checkpoint:
            d["lastCheckpoint"] = self.last_checkpoint.to_dict()
        if self.resume_exact is not None:
            d["resumeExact"] = self.resume_exact
            d["resumeExactReason"] = self.resume_exact_reason
        if self.standby is not None:
            d["standby"] = self.standby.to_dict()
        if self.notices or self.last_notice is not None:
            d["notices"] = self.notices
        if self.last_notice is not None:
            d["lastNotice"] = self.last_notice.to_dict()
        if self.promotions:
            d["promotions"] = self.promotions
        if self.last_attempt > self.attempts:
            d["lastAttempt"] = self.last_attempt
        if self.unstarted_preemptions:
            d["unstartedPreemptions"] = self.unstarted_preemptions
        if self.standby_failures:
            d["standbyFailures"] = self.standby_failures
        if self.progress is not None:
            d["progress"] = self.progress.to_dict()
        if self.hangs:
            d["hangs"] = self.hangs
        if self.last_hang is not None:
            d["lastHang"] = self.last_hang.to_dict()
        if self.members and any(a != self.attempts for a in self.members):
            d["members"] = list(self.members)
        if self.spare_members:
            d["spareMembers"] = list(self.spare_members)
        if self.replacements:
            d["replacements"] = self.replacements
        if self.last_replacement is not None:
            d["lastReplacement"] = self.last_replacement.to_dict()
        if self.straggler_moves:
            d["stragglerMoves"] = self.straggler_moves
        if self.last_move is not None:
            d["lastMove"] = self.last_move.to_dict()
        if self.image_pull is not None:
            d["imagePull"] = self.image_pull.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PhaseStatus":
        try:
            state = PhaseState(d.get("state", PhaseState.PENDING.value))
        except ValueError:
            state = PhaseState.PENDING
        return cls(
            name=d["name"], state=state, attempts=int(d.get("attempts", 0)),
            preemptions=int(d.get("preemptions", 0)), failures=int(d.get("failures", 0)),
            consecutive_failures_at_checkpoint=int(d.get("consecutiveFailuresAtCheckpoint", 0)),
            skipped_steps=tuple(int(s) for s in d.get("skippedSteps") or ()),
            pod=d.get("pod"), pod_uid=d.get("podUID"), resume_from=d.get("resumeFrom"),
            next_attempt_at=_ts(d.get("nextAttemptAt")), started_at=_ts(d.get("startedAt")),
            completed_at=_ts(d.get("completedAt")),
            last_failure=Failure.from_dict(d.get("lastFailure")),
            last_checkpoint=CheckpointRef.from_dict(d.get("lastCheckpoint")),
            resume_exact=bool(d["resumeExact"]) if d.get("resumeExact") is not None else None,
            resume_exact_reason=str(d.get("resumeExactReason") or ""),
            standby=StandbyRef.from_dict(d.get("standby")),
            notices=int(d.get("notices", 0)),
            last_notice=Notice.from_dict(d.get("lastNotice")),
            promotions=int(d.get("promotions", 0)),
            last_attempt=int(d.get("lastAttempt", 0)),
            standby_retry_at=_ts(d.get("standbyRetryAt")),
            unstarted_preemptions=int(d.get("unstartedPreemptions", 0)),
            standby_failures=int(d.get("standbyFailures", 0)),
            progress=ProgressRef.from_dict(d.get("progress")),
            hangs=int(d.get("hangs", 0)),
            last_hang=Hang.from_dict(d.get("lastHang")),
            members=tuple(int(a) for a in d.get("members") or ()),
            spare_members=tuple(int(m) for m in d.get("spareMembers") or ()),
            replacements=int(d.get("replacements", 0)),
            last_replacement=Replacement.from_dict(d.get("lastReplacement")),
            straggler_moves=int(d.get("stragglerMoves", 0)),
            last_move=Move.from_dict(d.get("lastMove")),
            image_pull=ImagePull.from_dict(d.get("imagePull")),
        )

    @property
    def next_attempt_number(self) -> int:
        return max(self.attempts, self.last_attempt,
                   self.standby.attempt if self.standby else 0) + 1


def phase_statuses(spec: JobSpec, status: Mapping[str, Any] | None) -> dict[str, PhaseStatus]:
    """Status per spec phase, in spec order; phases new in the spec start Pending."""
    known = {p.get("name"): p for p in (status or {}).get("phases") or () if p.get("name")}
    return {p.name: PhaseStatus.from_dict(known[p.name]) if p.name in known
            else PhaseStatus(name=p.name) for p in spec.phases}


__all__ = [
    "JobSpec", "PhaseSpec", "CheckpointSpec", "RecoverySpec", "PhaseStatus", "Failure",
    "CheckpointRef", "StandbyRef", "Notice", "ProgressRef", "ImagePull", "Hang", "Straggler", "phase_statuses", "ts", "parse_ts",
    "bounded",
]
