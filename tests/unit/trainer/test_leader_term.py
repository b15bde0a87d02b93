"""A deposed operator leader cannot overwrite its successor's fence or requests: the
operator's fence.json/control.json writes carry the leader's term (``LeaderTerm``) and
``core.handshake`` refuses a write over a newer term of the same Lease. Real files."""
from __future__ import annotations

import pytest

from phoenix_trainer.core.errors import StaleLeaderError
from phoenix_trainer.core.handshake import (
    CONTROL_NAME, FENCE_NAME, Control, Fence, LeaderTerm, advance_fence, read_control,
    read_fence, write_control, write_fence,
)
from phoenix_trainer.core.storage.file import LocalStorage

pytestmark = pytest.mark.unit

OLD = LeaderTerm(term=3, leader="op-a", lease_uid="L1")
NEW = LeaderTerm(term=4, leader="op-b", lease_uid="L1")


def test_a_deposed_leader_cannot_fence_over_its_successor(tmp_path):
    storage = LocalStorage(tmp_path)
    write_fence(storage, Fence(5, "p-5", "t", writer=NEW))
    with pytest.raises(StaleLeaderError, match="op-b in term 4.*term 3 \\(op-a\\)"):
        write_fence(storage, Fence(6, "p-6", "t", writer=OLD), clear_control=True)
    assert read_fence(storage) == Fence(5, "p-5", "t", writer=NEW)


def test_a_deposed_leader_cannot_write_requests_after_its_successor_did(tmp_path):
    """The successor wrote only control.json (a notice: checkpoint now); the fence is still
    the old leader's. The old leader's next fence or control write is refused all the same."""
    storage = LocalStorage(tmp_path)
    write_fence(storage, Fence(5, "p-5", "t", writer=OLD))
    write_control(storage, Control(5, checkpoint_now="n1", writer=NEW))
    with pytest.raises(StaleLeaderError):
        write_control(storage, Control(5, handoff_to=6, handoff_pod="p-6", writer=OLD))
    with pytest.raises(StaleLeaderError):
        write_fence(storage, Fence(6, "p-6", "t", writer=OLD), clear_control=True)
    assert read_control(storage) == Control(5, checkpoint_now="n1", writer=NEW)


def test_same_or_newer_term_writes_and_terms_of_another_lease_do_not_order(tmp_path):
    storage = LocalStorage(tmp_path)
    write_fence(storage, Fence(5, "p-5", "t", writer=OLD))
    write_fence(storage, Fence(6, "p-6", "t", writer=OLD))  # the same leader again
    write_fence(storage, Fence(7, "p-7", "t", writer=NEW))  # its successor
    # The Lease was deleted and made again: a fresh count, not comparable with the old one.
    write_control(storage, Control(7, checkpoint_now="x",
                                   writer=LeaderTerm(term=0, leader="op-a", lease_uid="L2")))
    # A standalone operator (no election) writes unordered, as before.
    write_fence(storage, Fence(8, "p-8", "t"))
    assert read_fence(storage).attempt == 8


def test_a_trainers_handoff_keeps_the_term_it_found(tmp_path):
    storage = LocalStorage(tmp_path)
    write_fence(storage, Fence(5, "p-5", "t", writer=NEW))
    write_control(storage, Control(5, handoff_to=6, handoff_pod="p-6", writer=NEW))
    assert advance_fence(storage, Fence(6, "p-6", "t2", resume_from="s3://b/ckpt/step-9"))
    assert read_fence(storage).writer == NEW
    with pytest.raises(StaleLeaderError):  # and the old leader still meets it
        write_fence(storage, Fence(7, "p-7", "t", writer=OLD))


def test_unreadable_files_do_not_block_and_the_term_round_trips(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put_bytes(FENCE_NAME, b"{not json")
    storage.put_bytes(CONTROL_NAME, b"[]")
    write_fence(storage, Fence(1, "p-1", "t", writer=OLD))
    assert read_fence(storage).writer == OLD
    assert Control.from_json(Control(1, writer=NEW).to_json()).writer == NEW
    assert '"leader"' not in Fence(1).to_json()  # no election: the file is as before
