"""The history on the real S3 server: appended by the operator (``phase_storage.append_history``),
read back whole in one GET by the same code ``phoenixctl report`` uses; append-only (records
already there are kept byte for byte; the same record twice is one); a deposed leader's
append is refused once a newer term has written; the trainer's attempt log is read for the
end record's digest."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from phoenix_operator import history
from phoenix_operator.decide import AttemptEnd
from phoenix_operator.phase_storage import append_history, read_attempt_log, read_history
from phoenix_operator.phoenixjob import JobSpec
from phoenix_trainer.core.errors import StaleLeaderError
from phoenix_trainer.core.handshake import LeaderTerm
from phoenix_trainer.core.layout import HISTORY_KEY, metrics_key
from phoenix_trainer.core.storage import Credentials, open_storage

pytestmark = pytest.mark.storage

T0 = datetime(2026, 3, 1, 10, tzinfo=timezone.utc)


@pytest.fixture
def prefix(s3_bucket):
    ep = s3_bucket.endpoint
    creds = Credentials(endpoint_url=ep.url, access_key=ep.access_key, secret_key=ep.secret_key)
    spec = JobSpec.parse({"phases": [{"name": "train"}], "checkpoint": {"uri": f"{s3_bucket.uri}/run"}})
    return spec, creds, open_storage(f"{s3_bucket.uri}/run/train", creds)


def term(n: int) -> LeaderTerm:
    return LeaderTerm(term=n, leader=f"op-{n}", lease_uid="lease-1")


def by(n: int) -> dict:
    t = term(n)
    return {"replica": t.leader, "term": t.term, "lease": t.lease_uid}


def records(n: int, leader: int = 1):
    out = []
    for a in range(1, n + 1):
        out.append(history.start_record("train", a, f"j-train-{a}", resume_from=None,
                                        promoted=False, time=T0 + timedelta(seconds=a), by=by(leader)))
        out.append(history.end_record(AttemptEnd(
            phase="train", attempt=a, cause="preemption", reason="Evicted",
            ended=T0 + timedelta(seconds=a + 1), pod=f"j-train-{a}"), by=by(leader), gpus=1))
    return out


def test_append_then_read_back_append_only(prefix):
    spec, creds, storage = prefix
    assert read_history(spec, "train", credentials=creds) == []
    first = records(2)
    append_history(spec, "train", first, credentials=creds, writer=term(1))
    before = storage.get_bytes(HISTORY_KEY)
    # the same records again (a retried pass) plus one new: only the new one is added
    more = records(3)
    merged = append_history(spec, "train", more, credentials=creds, writer=term(1))
    after = storage.get_bytes(HISTORY_KEY)
    assert after.startswith(before)  # nothing already written was rewritten
    assert len(merged) == 6 and read_history(spec, "train", credentials=creds) == merged
    assert [json.loads(line)["attempt"] for line in after.decode().splitlines()] == [1, 1, 2, 2, 3, 3]


def test_a_deposed_leader_cannot_append_over_a_newer_terms_history(prefix):
    spec, creds, _ = prefix
    append_history(spec, "train", records(1, leader=2), credentials=creds, writer=term(2))
    with pytest.raises(StaleLeaderError):
        append_history(spec, "train", records(2, leader=1), credentials=creds, writer=term(1))
    assert len(read_history(spec, "train", credentials=creds)) == 2


def test_the_attempt_log_feeds_the_digest(prefix):
    spec, creds, storage = prefix
    lines = [{"event": "resume", "step": 40, "time": "2026-03-01T10:00:00.000Z", "attempt": 2},
             {"event": "step", "step": 41, "time": "2026-03-01T10:00:01.000Z", "attempt": 2},
             {"event": "checkpoint", "step": 41, "time": "2026-03-01T10:00:01.500Z", "attempt": 2}]
    storage.put_bytes(metrics_key(2), ("\n".join(map(json.dumps, lines)) + "\n{\"torn").encode())
    events = read_attempt_log(spec, "train", 2, credentials=creds)
    assert len(events) == 3  # the torn last line is skipped
    d = history.digest_attempt_log(events)
    assert (d["startStep"], d["lastStep"], d["checkpoints"]) == (40, 41, 1)
    assert read_attempt_log(spec, "train", 9, credentials=creds) == []
