"""What ``decide`` reads and what it returns: the verified storage facts it is handed
(``Checkpoint``, ``Listing``), the plan's items (``CreatePod``, ``Promote``, ``ControlWrite``,
``DeletePod``, ``Note``, ``Recovery``, ``AttemptEnd``, ``Plan``), views of the job's pods, and ``Ctx``, the
state one decision shares between the phase modules (facts in, plan out).

Pure data and pure reads: no API calls, no clock, no storage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Sequence

from .. import constants as C
from ..node_health import NodeHealth, node_grace_left, stranded
from ..outcomes import Outcome, classify, waiting_grace_left
from ..phoenixjob import JobSpec
from ..podspec import member_of
from phoenix_trainer.core.handshake import Control, Fence

STORAGE_RETRY_SECONDS = 15.0
# A foreign pod holds a name we need: look again this often (its deletion, if it carries our
# job label, triggers a pass at once anyway).
CONFLICT_RETRY_SECONDS = 30.0


# --- inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One ``step-N`` directory as the operator verified it."""

    step: int
    uri: str
    valid: bool
    reason: str = ""
    epoch: int | None = None
    time: datetime | None = None
    resume_exact: bool | None = None  # from the manifest's extra, when the trainer wrote it
    resume_exact_reason: str = ""


@dataclass(frozen=True)
class Listing:
    """The checkpoints under one phase's prefix, or why they could not be listed."""

    checkpoints: tuple[Checkpoint, ...] = ()
    error: str | None = None
    # The prefix's fence.json as found (None: none), and - when it names another job -
    # whether that job still exists (None: could not tell).
    fence: Fence | None = None
    owner_live: bool | None = None

    def newest_valid(self, exclude: Sequence[int] = ()) -> Checkpoint | None:
        for c in sorted(self.checkpoints, key=lambda c: c.step, reverse=True):
            if c.valid and c.step not in exclude:
                return c
        return None

    def invalid_newer_than(self, step: int | None) -> list[Checkpoint]:
        return sorted((c for c in self.checkpoints
                       if not c.valid and (step is None or c.step > step)),
                      key=lambda c: c.step, reverse=True)


@dataclass(frozen=True)
class RankProgress:
    """One rank's newest heartbeat (``core.heartbeat.Heartbeat``) as ``gather`` read it, with
    ``stalled`` brought up to the time of the read: the rank's own count when it wrote, plus
    how long the operator has seen that same heartbeat unchanged (a frozen process writes
    none). ``stack_dump``: the dump's URI, once the rank wrote one."""

    rank: int
    pod: str
    step: int
    activity: str
    stalled: float
    frozen: bool = False  # its heartbeat stopped being rewritten
    step_p50: float | None = None
    step_p95: float | None = None
    compute_p50: float | None = None
    steps_timed: int = 0
    stack_dump: str = ""
    in_collective: bool = False  # waiting on its peers in this step's first collective
    node: str = ""
    # after a restore: where its state came from (peers | checkpoint | none), the step, and
    # unix time of its first step after it (core.heartbeat.Heartbeat)
    restored_from: str = ""
    restored_step: int | None = None
    training_since: float | None = None


@dataclass(frozen=True)
class PhaseProgress:
    """A running attempt's heartbeats (``ranks`` empty: none written yet)."""

    attempt: int
    ranks: tuple[RankProgress, ...] = ()
    error: str | None = None  # the read failed: nothing is decided from it


# --- outputs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GangFence:
    """What an in-place gang's fence names besides the attempt (``handshake.Fence``): the
    pod serving each member, and the attempt's TCPStore."""

    members: tuple[str, ...]
    store: str
    store_member: int


@dataclass(frozen=True)
class CreatePod:
    name: str
    phase: str
    attempt: int
    manifest: dict[str, Any]
    resume_from: str | None
    previous_end: datetime | None  # when the attempt it replaces ended (time-to-replacement)
    previous_cause: str | None
    standby: bool = False  # a standby: the fence is not moved for it
    gang: GangFence | None = None  # an in-place gang's attempt: written into its fence


@dataclass(frozen=True)
class Promote:
    """Move the phase's fence to a waiting standby (its signal to start), naming the
    checkpoint to resume from. Written before the status that records it."""

    phase: str
    attempt: int
    pod: str
    resume_from: str | None
    previous_end: datetime | None
    previous_cause: str | None
    # An in-place gang's spare taking a lost member's place (no pod to create): the fence
    # names every member's pod and the store, as a new member's ``CreatePod.gang`` would.
    gang: GangFence | None = None


@dataclass(frozen=True)
class ControlWrite:
    """Write ``control.json`` for a phase (requests to its running attempt)."""

    phase: str
    control: Control


@dataclass(frozen=True)
class DeletePod:
    name: str
    grace_seconds: int
    reason: str
    # Grace 0 because the pod's node is lost: applied before any create of the same plan, so
    # the replacement never coexists with the old pod object.
    force: bool = False


@dataclass(frozen=True)
class Note:
    """A Kubernetes Event to post on the PhoenixJob."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Recovery:
    """An attempt that ended unsuccessfully (for metrics: recoveries by cause)."""

    phase: str
    cause: str
    reason: str


@dataclass(frozen=True)
class AttemptEnd:
    """An attempt that ended, as ``attempts.account`` judged it: the facts the durable
    history (``history``) records about it, written after the plan's pods exist."""

    phase: str
    attempt: int
    cause: str
    reason: str
    ended: datetime
    pod: str | None = None  # the pod that ended it (a gang: the member that caused it)
    node: str | None = None
    created: datetime | None = None  # when that pod was created (GPU time paid from here)
    exit_code: int | None = None
    message: str = ""
    stopped_step: int | None = None  # the trainer's termination message: where it stopped
    checkpoint: str | None = None  # ... and the checkpoint it names
    members: int = 1


@dataclass
class Plan:
    status: dict[str, Any]
    create: list[CreatePod] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)  # ensured before the pods
    promote: list[Promote] = field(default_factory=list)  # storage writes: before the status
    control: list[ControlWrite] = field(default_factory=list)
    delete: list[DeletePod] = field(default_factory=list)
    events: list[Note] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    ended: list[AttemptEnd] = field(default_factory=list)  # for the history (apply's last step)
    needs_checkpoints: set[str] = field(default_factory=set)
    requeue_after: float | None = None
    # For metrics: per running phase, (rank, median step seconds, median compute seconds).
    rank_times: dict[str, list[tuple[int, float | None, float | None]]] = field(default_factory=dict)

    def requeue(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        if self.requeue_after is None or seconds < self.requeue_after:
            self.requeue_after = seconds


# --- the job's pods, and one decision's state ---------------------------------------

Pods = Mapping[int, Sequence[Mapping[str, Any]]]  # attempt -> its pods (a gang's members)


def gang_pods(pods: Pods, st: Any, replicas: int) -> list[Mapping[str, Any]]:
    """The current gang's pods, by member: each member's from the attempt that serves it
    (``PhaseStatus.member_attempt``: survivors of an in-place replacement keep their older
    pods); one pod: the current attempt's."""
    if replicas <= 1:
        return list(pods.get(st.attempts, ()))
    out = []
    for member in range(replicas):
        out += [p for p in pods.get(st.member_attempt(member), ()) if member_of(p) == member]
    return out


def is_spare_pod(pod: Mapping[str, Any]) -> bool:
    """An in-place gang's spare member (``podspec.build_pod(spare=True)``)."""
    return ((pod.get("metadata") or {}).get("labels") or {}).get(C.LABEL_SPARE) == "true"


def with_spares(pods: Pods, st: Any) -> Pods:
    """``pods`` with each former spare labelled as the member it serves
    (``PhaseStatus.spare_members``), in a copy: a spare is created before anyone knows which
    member it will serve, so only the status says it; from here on ``member_of`` and
    ``gang_pods`` see it as that member. Idempotent; the API objects are not touched."""
    if not st.spare_members:
        return pods
    out = {a: list(members) for a, members in pods.items()}
    for m in st.spare_members:
        a = st.member_attempt(m)
        out[a] = [_as_member(p, m) if is_spare_pod(p) else p for p in out.get(a, ())]
    return out


def _as_member(pod: Mapping[str, Any], member: int) -> dict[str, Any]:
    meta = dict(pod.get("metadata") or {})
    meta["labels"] = {**(meta.get("labels") or {}), C.LABEL_MEMBER: str(member)}
    return {**pod, "metadata": meta}


def is_standby_pod(pod: Mapping[str, Any]) -> bool:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(C.LABEL_STANDBY) == "true"


def pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or ())


def pods_by_phase(pods: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, list[Mapping[str, Any]]]]:
    out: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        try:
            attempt = int(labels.get(C.LABEL_ATTEMPT, ""))
        except ValueError:
            continue
        out.setdefault(labels.get(C.LABEL_PHASE, ""), {}).setdefault(attempt, []).append(pod)
    for attempts in out.values():
        for members in attempts.values():
            members.sort(key=member_of)
    return out


@dataclass
class Ctx:
    """One decision's facts and the plan it builds (the phase modules' shared state)."""

    job: str
    namespace: str
    uid: str
    spec: JobSpec
    checkpoints: Mapping[str, Listing]
    now: datetime
    plan: Plan
    nodes: Mapping[str, NodeHealth] = field(default_factory=dict)
    foreign: Mapping[str, str] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    prefix_conflicts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # checkpoints the status names, not listed
    storage_errors: list[str] = field(default_factory=list)  # listings that failed, and why
    stranded: list[str] = field(default_factory=list)
    progress: Mapping[str, PhaseProgress] = field(default_factory=dict)  # running phases'
    stragglers: list[str] = field(default_factory=list)  # the Straggler condition's lines

    def note(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append(Note(type_, reason, message))

    def outcome(self, pod: Mapping[str, Any]) -> Outcome:
        """``outcomes.classify`` with the node facts: a pod on a lost node is over; one on a node
        NotReady past the grace is stranded (noted, not replaced)."""
        grace = C.NODE_NOT_READY_GRACE_SECONDS
        left = node_grace_left(pod, self.nodes, self.now, grace)
        if left is not None:
            self.plan.requeue(left)  # look again when the NotReady grace runs out
        waiting = waiting_grace_left(pod, self.now)
        if waiting is not None and waiting > 0:
            self.plan.requeue(waiting)  # a pull or create error counts once its grace is over
        why = stranded(pod, self.nodes, self.now, grace)
        if why and why not in self.stranded:
            self.stranded.append(why)
        return classify(pod, self.nodes, self.now)

    def delete_live(self, pods: Sequence[Mapping[str, Any]], reason: str,
                    grace: int | None = None) -> None:
        """Delete pods (live ones with their grace, or ended ones whose objects go) that are
        not being deleted yet and not already planned."""
        planned = {d.name for d in self.plan.delete}
        for pod in pods:
            if not (pod.get("metadata") or {}).get("deletionTimestamp") and pod["metadata"]["name"] not in planned:
                self.plan.delete.append(DeletePod(pod["metadata"]["name"],
                                                  self.spec.recovery.grace_seconds if grace is None else grace,
                                                  reason))
