"""core.repeated.RepeatedFailure: a polling loop's repeated failure is warned about once,
then at most once per period with the count since, and cleared with one info line."""
from __future__ import annotations

import logging

import pytest

from phoenix_trainer.core.handshake import Fence, write_fence
from phoenix_trainer.core.repeated import RepeatedFailure
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.rejoin import CARRIED, wait_for_place

pytestmark = pytest.mark.unit


def test_warned_once_per_period_with_the_count_then_cleared(caplog):
    now = [0.0]
    failures = RepeatedFailure(logging.getLogger("t"), "reading the fence", every=30,
                               clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(60):  # 30 s of polls twice a second
            failures.failed(OSError("connection refused"))
            now[0] += 0.5
        failures.failed(OSError("connection refused"))  # at 30 s: the period is over
        failures.succeeded()
        failures.succeeded()  # nothing to say while it works
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "reading the fence failed (OSError: connection refused); retrying"),
        ("WARNING", "reading the fence failed (OSError: connection refused); retrying "
                    "(60 failures since the last warning)"),
        ("INFO", "reading the fence works again after 61 failures"),
    ]


def test_a_new_outage_after_recovery_is_warned_at_once(caplog):
    failures = RepeatedFailure(logging.getLogger("t"), "x", every=30, clock=lambda: 5.0)
    with caplog.at_level(logging.WARNING, logger="t"):
        failures.failed(OSError("a"))
        failures.succeeded()
        failures.failed(OSError("b"))
    assert [r.getMessage() for r in caplog.records] == [
        "x failed (OSError: a); retrying", "x failed (OSError: b); retrying"]


class FlakyStorage(LocalStorage):
    """Fence reads fail ``n`` times, then work."""
    def __init__(self, root, n: int) -> None:
        super().__init__(root)
        self.n = n

    def get_bytes(self, key: str) -> bytes:
        if self.n > 0:
            self.n -= 1
            raise OSError("S3 unreachable")
        return super().get_bytes(key)


def test_a_spare_polling_through_an_outage_warns_once_and_takes_its_place(tmp_path, caplog):
    storage = FlakyStorage(tmp_path, 0)
    write_fence(storage, Fence(4, "job-4", "t", members=("job-4.train-0.4", "job-4.spare")))
    storage.n = 200
    with caplog.at_level(logging.WARNING):
        outcome, fence = wait_for_place(storage, pod="job-4.spare", uid="", stopped=lambda: False,
                                        poll=0, sleep=lambda s: None)
    assert outcome == CARRIED and fence.attempt == 4
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "spare: reading the fence failed (OSError: S3 unreachable); retrying"]
