"""The operator <-> trainer handshake through the phase's prefix: ``fence.json`` and
``control.json``. This module owns both files: their types, their one reader and their one
writer each, and the fence check every checkpoint write and deletion goes through.

``<prefix>/fence.json`` names the newest attempt the operator started for the phase (it is
written before that attempt's pod is created). An attempt older than the fence is superseded:
it must not publish (manifest) or delete (retention) checkpoints, so a trainer left running
on a partitioned node cannot overwrite or prune what its successor relies on. A standby
attempt (started ahead of need) is newer than the fence until it is promoted: the fence
moving to it is its signal to start. Writers: the operator (``write_fence``, when it starts
an attempt or promotes a standby) and a trainer handing off to its standby
(``advance_fence``, which never moves the fence back).

``<prefix>/control.json`` carries the operator's requests to the running attempt
(checkpoint now, hand off to the standby); see ``Control``. Writer: the operator only.

With several operator replicas, the operator's writes of both files carry the writer's
``LeaderTerm`` (which Lease, which term, which replica) and are refused
(``StaleLeaderError``) where either file already carries a newer term of the same Lease: a
leader partitioned away that comes back cannot overwrite its successor's fence or requests,
whatever the timing. A trainer's handoff keeps the term it found.

Nobody else reads or writes these names. No torch import; nothing from ``phoenix_trainer``
outside ``core``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import CorruptCheckpointError, StaleLeaderError, SupersededError
from .storage import Storage

FENCE_NAME = "fence.json"
CONTROL_NAME = "control.json"


@dataclass(frozen=True)
class LeaderTerm:
    """Which operator leader wrote a file: the Lease (its uid), its term there (the Lease's
    transition count at that leader's acquisition) and the replica. Empty (no ``leader``): a
    standalone operator or a trainer, whose writes are not ordered by term."""

    term: int = 0
    leader: str = ""
    lease_uid: str = ""

    def __bool__(self) -> bool:
        return bool(self.leader)

    def superseded_by(self, other: "LeaderTerm") -> bool:
        """Whether ``other`` was written by a newer leader of the same Lease. Terms of
        different Leases (one deleted and created again) are not comparable: not superseded."""
        return bool(self and other and self.lease_uid == other.lease_uid
                    and other.term > self.term)

    def to_dict(self) -> dict[str, Any]:
        return {"term": self.term, "leader": self.leader, "lease": self.lease_uid}

    @classmethod
    def from_dict(cls, data: Any) -> "LeaderTerm":
        if not isinstance(data, dict):
            return cls()
        return cls(term=int(data.get("term") or 0), leader=str(data.get("leader") or ""),
                   lease_uid=str(data.get("lease") or ""))


@dataclass(frozen=True)
class Fence:
    """``<prefix>/fence.json``: the attempt that may write the phase's checkpoints.

    ``resume_from`` is set when a waiting standby is promoted: the checkpoint it must resume
    from (the operator's verified choice, or the final checkpoint of the attempt that handed
    off to it)."""

    attempt: int
    pod: str = ""
    time: str = ""
    resume_from: str = ""
    # The job that holds the prefix: its UID (a re-created job of the same name has another)
    # and "namespace/name". Empty in fences written before the UID was added.
    uid: str = ""
    job: str = ""
    writer: LeaderTerm = field(default_factory=LeaderTerm)  # the operator leader that wrote it
    # An in-place gang (gangRestart: Member): the pod serving each member (index = member;
    # survivors keep their older pods), and the attempt's TCPStore ("host:port", hosted by
    # local rank 0 of ``store_member``). A survivor whose pod is named here is carried into
    # this attempt; a pod of an older attempt that is not is superseded.
    members: tuple[str, ...] = ()
    store: str = ""
    store_member: int = 0

    def carries(self, pod: str, member: int) -> bool:
        """Whether this fence carries ``pod`` (serving ``member``) into its attempt."""
        return bool(pod) and 0 <= member < len(self.members) and self.members[member] == pod

    def to_json(self) -> str:
        d: dict[str, Any] = {"attempt": self.attempt, "pod": self.pod, "time": self.time}
        if self.resume_from:
            d["resumeFrom"] = self.resume_from
        if self.uid:
            d["uid"] = self.uid
        if self.job:
            d["job"] = self.job
        if self.writer:
            d["leader"] = self.writer.to_dict()
        if self.members:
            d["members"] = list(self.members)
            d["store"] = self.store
            d["storeMember"] = self.store_member
        return json.dumps(d, sort_keys=True)

    def holds(self, attempt: int, uid: str = "") -> bool:
        """Whether ``attempt`` of the job ``uid`` may write: not when a newer attempt is
        fenced, nor when another job is (whatever its number). No uid on either side: the
        attempt number alone decides."""
        if uid and self.uid and uid != self.uid:
            return False
        return self.attempt <= attempt

    @classmethod
    def from_json(cls, text: str | bytes) -> "Fence":
        try:
            data = json.loads(text)
            return cls(attempt=int(data["attempt"]), pod=str(data.get("pod", "")),
                       time=str(data.get("time", "")),
                       resume_from=str(data.get("resumeFrom") or ""),
                       uid=str(data.get("uid") or ""), job=str(data.get("job") or ""),
                       writer=LeaderTerm.from_dict(data.get("leader")),
                       members=tuple(str(m) for m in data.get("members") or ()),
                       store=str(data.get("store") or ""),
                       store_member=int(data.get("storeMember") or 0))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptCheckpointError(f"{FENCE_NAME} is unreadable ({e!r})") from e


@dataclass(frozen=True)
class Control:
    """``<prefix>/control.json``: the operator's requests to one running attempt.

    ``checkpoint_now``: an id; each new id asks for one checkpoint at the next step boundary
    (a preemption notice came). ``handoff_to``: stop at the next step boundary with a final
    checkpoint, then fence the phase for that (standby) attempt, naming the checkpoint, and
    exit as preempted; the standby resumes from it."""

    attempt: int
    checkpoint_now: str = ""
    handoff_to: int | None = None
    handoff_pod: str = ""
    time: str = ""
    uid: str = ""  # the job the requests are for: another job's stale requests are ignored
    writer: LeaderTerm = field(default_factory=LeaderTerm)  # the operator leader that wrote it

    def for_attempt(self, attempt: int, uid: str = "") -> bool:
        return self.attempt == attempt and not (uid and self.uid and uid != self.uid)

    def to_json(self) -> str:
        d: dict[str, Any] = {"attempt": self.attempt, "time": self.time}
        if self.uid:
            d["uid"] = self.uid
        if self.checkpoint_now:
            d["checkpointNow"] = self.checkpoint_now
        if self.handoff_to is not None:
            d["handoffTo"] = self.handoff_to
            d["handoffPod"] = self.handoff_pod
        if self.writer:
            d["leader"] = self.writer.to_dict()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Control":
        try:
            data = json.loads(text)
            to = data.get("handoffTo")
            return cls(attempt=int(data["attempt"]),
                       checkpoint_now=str(data.get("checkpointNow") or ""),
                       handoff_to=int(to) if to is not None else None,
                       handoff_pod=str(data.get("handoffPod") or ""),
                       time=str(data.get("time") or ""), uid=str(data.get("uid") or ""),
                       writer=LeaderTerm.from_dict(data.get("leader")))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptCheckpointError(f"{CONTROL_NAME} is unreadable ({e!r})") from e


def read_control(storage: Storage) -> Control | None:
    try:
        return Control.from_json(storage.get_bytes(CONTROL_NAME))
    except FileNotFoundError:
        return None


def read_fence(storage: Storage) -> Fence | None:
    """The phase's fence, or None if no operator ever wrote one (a run outside Phoenix)."""
    try:
        return Fence.from_json(storage.get_bytes(FENCE_NAME))
    except FileNotFoundError:
        return None


def _refuse_stale_leader(storage: Storage, writer: LeaderTerm, what: str) -> None:
    """``StaleLeaderError`` if the fence or control document carries a newer leader's term
    (see the module docstring). One or two small reads, only for a leader's writes."""
    if not writer:
        return
    for name, read in ((FENCE_NAME, read_fence), (CONTROL_NAME, read_control)):
        try:
            found = read(storage)
        except CorruptCheckpointError:
            continue  # unreadable: no term to respect; the write replaces it
        if found is not None and writer.superseded_by(found.writer):
            raise StaleLeaderError(
                f"refusing to {what} under {storage.uri}: {name} was written by "
                f"{found.writer.leader} in term {found.writer.term}, newer than this "
                f"operator's term {writer.term} ({writer.leader})")


def write_fence(storage: Storage, fence: Fence, *, clear_control: bool = False) -> str:
    """Write the phase's fence (whatever attempt it named before; never over a newer
    leader's, see ``LeaderTerm``). ``clear_control``: a new attempt starts, so requests left
    for an older one (or a deleted job's) go. Returns its URI."""
    _refuse_stale_leader(storage, fence.writer, f"fence attempt {fence.attempt}")
    storage.put_bytes(FENCE_NAME, fence.to_json().encode())
    if clear_control:
        storage.delete(CONTROL_NAME)
    return storage.uri_for(FENCE_NAME)


def advance_fence(storage: Storage, fence: Fence) -> bool:
    """Write ``fence`` unless the prefix already has one for its attempt or a newer one (a
    handoff must never move the fence back). Whether it was written."""
    current = read_fence(storage)
    if current is not None and current.attempt >= fence.attempt:
        return False
    # The term it found, kept (the trainer is no leader: no term check of its own; a stale
    # leader's later write still meets the newer term here or in control.json).
    kept = replace(fence, writer=current.writer) if current else fence
    storage.put_bytes(FENCE_NAME, kept.to_json().encode())
    return True


def write_control(storage: Storage, control: Control) -> str:
    """Write the phase's control document: requests to its running attempt (never over a
    newer leader's, see ``LeaderTerm``). Its URI."""
    _refuse_stale_leader(storage, control.writer, f"write {CONTROL_NAME}")
    storage.put_bytes(CONTROL_NAME, control.to_json().encode())
    return storage.uri_for(CONTROL_NAME)


def check_fence(storage: Storage, attempt: int | None, what: str, uid: str = "") -> None:
    """Raise ``SupersededError`` unless ``attempt`` of the job ``uid`` holds the phase's fence
    (``Fence.holds``): the operator started a newer attempt, or another job (a re-created
    one) took the prefix. No attempt (a run outside the operator) or no fence: nothing to
    check."""
    if attempt is None:
        return
    fence = read_fence(storage)
    if fence is not None and not fence.holds(attempt, uid):
        whose = (f" of job {fence.job or '?'} (uid {fence.uid})"
                 if uid and fence.uid and fence.uid != uid else "")
        raise SupersededError(
            f"attempt {attempt} is superseded by attempt {fence.attempt}{whose} (pod "
            f"{fence.pod or '?'}, started {fence.time or '?'}): refusing to {what} under "
            f"{storage.uri}")
