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

Nobody else reads or writes these names. No torch import; nothing from ``phoenix_trainer``
outside ``core``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import CorruptCheckpointError, SupersededError
from .storage import Storage

FENCE_NAME = "fence.json"
CONTROL_NAME = "control.json"


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

    def to_json(self) -> str:
        d: dict[str, Any] = {"attempt": self.attempt, "pod": self.pod, "time": self.time}
        if self.resume_from:
            d["resumeFrom"] = self.resume_from
        if self.uid:
            d["uid"] = self.uid
        if self.job:
            d["job"] = self.job
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
                       uid=str(data.get("uid") or ""), job=str(data.get("job") or ""))
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
                       time=str(data.get("time") or ""), uid=str(data.get("uid") or ""))
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


def write_fence(storage: Storage, fence: Fence, *, clear_control: bool = False) -> str:
    """Write the phase's fence (whatever it said before). ``clear_control``: a new attempt
    starts, so requests left for an older one (or a deleted job's) go. Returns its URI."""
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
    write_fence(storage, fence)
    return True


def write_control(storage: Storage, control: Control) -> str:
    """Write the phase's control document: requests to its running attempt. Its URI."""
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
