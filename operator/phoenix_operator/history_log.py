"""The operator's edge for the durable history (``history``): after a plan's pods exist,
turn what the plan did into history records, append them to each phase's
``history.jsonl`` (``phase_storage.append_history``) and put the summary into
``status.history``.

Never blocks or fails a recovery: it is the last step of ``apply.STEPS`` (the replacement
pod was created before it runs), and any trouble (storage down, a conflicting status write)
is logged and retried on the job's next pass from the records kept in memory
(``HistoryLog.pending``, bounded). If the operator restarts before they are written, the
end of the phase's last attempt is rebuilt from the status (``lastFailure``), with less
detail; notices too. Writes go through ``Applier.write`` (only the leader writes).
"""
from __future__ import annotations

import logging
import socket
from typing import Any

from kubernetes.client.rest import ApiException

from . import history
from .history import Record
from .phase_storage import append_history, read_attempt_log, read_history

# ``ap``/``a`` below: ``apply.Applier`` / ``apply.Applying`` (not imported: apply imports us).

log = logging.getLogger("phoenix.history")

MAX_PENDING = 2000  # per job: records waiting for storage (beyond: the oldest go, with a warning)


class HistoryLog:
    """What one operator process remembers between passes: per job uid, the records not yet
    written, the keys known to be in storage (so an unchanged status costs no read), and
    whether the status summary still needs writing."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Record]] = {}
        self.written: dict[str, set[tuple]] = {}
        self.summary_due: set[str] = set()
        self.append = append_history  # replaceable in tests
        self.read = read_history
        self.read_log = read_attempt_log


def decided_by(ap: Any) -> dict[str, Any]:
    term = ap.leadership().term
    return {"replica": term.leader or socket.gethostname(), "term": term.term,
            "lease": term.lease_uid}


def start_records(plan: Any, *, time: Any, by: dict) -> list[Record]:
    """The ``start`` and ``standby`` records of a plan's new attempts (a ``decide.Plan``): one
    per attempt however many of its pods were created (``members``: how many), one per
    promotion - a standby's, or an in-place gang's spare taking a lost member's place (a
    ``Promote`` with a ``gang``: recorded as ``spare``, not as a promoted standby)."""
    out: list[Record] = []
    members: dict[tuple[str, int], int] = {}
    for c in plan.create:
        members[(c.phase, c.attempt)] = members.get((c.phase, c.attempt), 0) + 1
    for c in plan.create:
        if (c.phase, c.attempt) not in members:
            continue  # a gang's other members: one record for the attempt
        n = members.pop((c.phase, c.attempt))
        if c.standby:
            out.append(history.standby_record(c.phase, c.attempt, c.name, time=time, by=by))
        else:
            out.append(history.start_record(
                c.phase, c.attempt, c.name, resume_from=c.resume_from, promoted=False, time=time,
                by=by, members=n, previous_cause=c.previous_cause))
    for p in plan.promote:
        spare = p.gang is not None
        out.append(history.start_record(p.phase, p.attempt, p.pod, resume_from=p.resume_from,
                                        promoted=not spare, spare=spare, time=time, by=by,
                                        previous_cause=p.previous_cause))
    return out


async def collect(ap: Any, a: Any, by: dict) -> list[Record]:
    """The records this plan makes (attempt logs of ended attempts read for their digest)."""
    plan, now = a.plan, ap.clock()
    gpus = history.gpus_per_pod((a.job.get("spec") or {}).get("template"))
    book: HistoryLog = ap.history
    out: list[Record] = []
    for end in plan.ended:
        digest = None
        try:
            access = await ap.gather.storage_access(a.job, a.spec)
            digest = history.digest_attempt_log(await ap.call(
                book.read_log, a.spec, end.phase, end.attempt, credentials=access))
        except Exception as e:  # noqa: BLE001 - the record goes without the log's digest
            log.warning("%s phase %s: cannot read attempt %d's log: %s", a.tag, end.phase,
                        end.attempt, e)
        pull = next((ph.get("imagePull") for ph in plan.status.get("phases") or ()
                     if ph.get("name") == end.phase), None)
        out.append(history.end_record(end, by=by, gpus=gpus, digest=digest, pull=pull))
    out += start_records(plan, time=now, by=by)
    # Notices (and the last failure, in case its detailed record was lost): from the status.
    out += history.status_records(plan.status, by)
    return out


async def record_history(ap: Any, a: Any) -> None:
    """apply's last step (see the module docstring): never raises, never stops the pass."""
    uid = a.job["metadata"].get("uid") or a.tag
    book: HistoryLog = ap.history
    try:
        by = decided_by(ap)
        written = book.written.setdefault(uid, set())
        fresh = [r for r in await collect(ap, a, by) if history.key(r) not in written]
        pending = book.pending.setdefault(uid, [])
        pending.extend(fresh)
        if len(pending) > MAX_PENDING:
            log.warning("%s history: %d records not written yet; dropping the oldest %d",
                        a.tag, len(pending), len(pending) - MAX_PENDING)
            del pending[:len(pending) - MAX_PENDING]
        if not pending and uid not in book.summary_due:
            return
        access = await ap.gather.storage_access(a.job, a.spec)
        for phase in history.phases(pending):
            mine = [r for r in pending if r["phase"] == phase]
            merged = await ap.write(book.append, a.spec, phase, mine, credentials=access,
                                    writer=ap.leadership().term)
            written.update(history.key(r) for r in merged)
            book.pending[uid] = pending = [r for r in pending if r["phase"] != phase]
            book.summary_due.add(uid)
            log.info("%s phase %s: history has %d records", a.tag, phase, len(merged))
        await _write_summary(ap, a, access)
        book.summary_due.discard(uid)
    except Exception as e:  # noqa: BLE001 - never fails the pass: the next one retries
        log.warning("%s history not written (retrying on the next pass): %s: %s", a.tag,
                    type(e).__name__, str(e)[:300])


async def _write_summary(ap: Any, a: Any, access) -> None:
    records: list[Record] = []
    for phase in a.spec.phases:
        records += await ap.call(ap.history.read, a.spec, phase.name, credentials=access)
    summary = history.summarize(records)
    current = await ap.call(ap.kube.get_job, a.namespace, a.name)
    if current is None or (current.get("status") or {}).get("history") == summary:
        return
    try:
        await ap.write(ap.kube.patch_status, current, {"history": summary})
    except ApiException as e:
        if e.status != 409:
            raise
        ap.history.summary_due.add(a.job["metadata"].get("uid") or a.tag)
        raise
