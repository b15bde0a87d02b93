"""In-place gang recovery's pure parts: the fence's member fields, the member's place from its
environment, the wait for the fence that carries a survivor, what counts as a lost peer, the
peer snapshots kept on disk, and the heartbeat's restore fields. (The processes themselves:
tests/storage/test_rejoin.py.)"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from phoenix_trainer.core.handshake import Fence, read_fence, write_fence
from phoenix_trainer.core.heartbeat import Heartbeat
from phoenix_trainer.core.storage import open_storage
from phoenix_trainer.rejoin import (CARRIED, STOPPED, SUPERSEDED, TIMED_OUT, GangMember, PeerState,
                                    _pack, _unpack, fill, is_collective_error, is_replicated,
                                    rejoin_record, wait_for_fence)

pytestmark = pytest.mark.unit

ENV = {"PHOENIX_GANG_RESTART": "Member", "PHOENIX_GANG_MEMBERS": "3", "PHOENIX_GANG_MEMBER": "2",
       "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "PHOENIX_GANG_STORE": "train-1.svc:29502",
       "PHOENIX_GANG_STORE_MEMBER": "1", "PHOENIX_ATTEMPT": "2", "PHOENIX_POD_NAME": "j.train-2.2"}


def test_fence_members_round_trip_and_carry():
    fence = Fence(3, "j.train-3.0", members=("j.train-3.0", "j.train-1.1", "j.train-2.2"),
                  store="train-1.j.ns.svc:29503", store_member=1)
    data = json.loads(fence.to_json())
    assert data["members"] == ["j.train-3.0", "j.train-1.1", "j.train-2.2"]
    assert data["store"] == "train-1.j.ns.svc:29503" and data["storeMember"] == 1
    back = Fence.from_json(fence.to_json())
    assert back == fence
    assert back.carries("j.train-1.1", 1) and back.carries("j.train-2.2", 2)
    assert not back.carries("j.train-1.2", 2)  # the lost member's old pod
    assert not back.carries("j.train-1.1", 5) and not back.carries("", 0)


def test_fence_without_members_is_todays():
    old = Fence.from_json('{"attempt": 4, "pod": "j.train-4"}')
    assert old.members == () and old.store == "" and not old.carries("j.train-4", 0)
    assert "members" not in json.loads(old.to_json())


def test_member_from_env():
    me = GangMember.from_env(ENV)
    assert (me.rank, me.world_size) == (2 * 4 + 1, 12)
    assert (me.store_host, me.store_port, me.store_member, me.attempt) == ("train-1.svc", 29502, 1, 2)
    assert not me.hosts_store
    assert GangMember.from_env({**ENV, "PHOENIX_GANG_MEMBER": "1", "LOCAL_RANK": "0"}).hosts_store
    assert GangMember.from_env({**ENV, "PHOENIX_GANG_RESTART": "Whole"}) is None
    assert GangMember.from_env({}) is None


@pytest.mark.parametrize("key,value,named", [
    ("PHOENIX_GANG_STORE", "nohostport", "PHOENIX_GANG_STORE"),
    ("PHOENIX_GANG_MEMBER", "x", "PHOENIX_GANG_MEMBER"),
    ("PHOENIX_GANG_MEMBER", "3", "PHOENIX_GANG_MEMBER"),
])
def test_member_env_errors_name_the_variable(key, value, named):
    with pytest.raises(ValueError, match=named):
        GangMember.from_env({**ENV, key: value})


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def _wait(storage, clock, stopped=lambda: False, timeout=10.0):
    return wait_for_fence(storage, attempt=1, member=2, pod="j.train-1.2", stopped=stopped,
                          timeout=timeout, clock=clock, sleep=clock.sleep)


def test_wait_for_fence_outcomes(tmp_path):
    storage = open_storage(f"file://{tmp_path}/p")
    clock = FakeClock()
    write_fence(storage, Fence(1, "j.train-1.0", members=("a", "b", "j.train-1.2")))
    assert _wait(storage, clock, timeout=5.0) == (TIMED_OUT, read_fence(storage))  # same attempt
    assert 5.0 <= clock.now <= 5.5  # polled every 0.5 s up to the bound
    carried = Fence(2, "x", members=("j.train-2.0", "b", "j.train-1.2"), store="h:1", store_member=2)
    write_fence(storage, carried)
    assert _wait(storage, clock) == (CARRIED, carried)
    replaced = Fence(2, "x", members=("a", "b", "j.train-2.2"))
    write_fence(storage, replaced)
    assert _wait(storage, clock) == (SUPERSEDED, replaced)
    write_fence(storage, Fence(2, "whole-gang"))  # a Whole restart: no members at all
    assert _wait(storage, clock)[0] == SUPERSEDED
    assert _wait(storage, clock, stopped=lambda: True) == (STOPPED, None)


def test_wait_for_fence_without_a_fence_is_bounded(tmp_path):
    clock = FakeClock()
    assert _wait(open_storage(f"file://{tmp_path}/none"), clock, timeout=3.0) == (TIMED_OUT, None)


def test_collective_errors_and_bugs():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed"
                        " by peer [10.0.0.3]:4242")
    assert is_collective_error(gloo)
    assert is_collective_error(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out"
                                            " waiting 60000ms for recv operation to complete"))
    assert is_collective_error(dist.DistBackendError("NCCL communicator was aborted"))
    try:
        try:
            raise gloo
        except RuntimeError as e:
            raise KeyError("wrapped") from e
    except KeyError as wrapped:
        assert is_collective_error(wrapped)
    assert not is_collective_error(ValueError("injected bug"))
    assert not is_collective_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_pack_unpack_and_fill_in_place():
    tree = {"model": {"w": torch.randn(3, 2), "b": torch.zeros(0), "i": torch.tensor(7)},
            "optim": {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(4).half()}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]}}
    chunks, size = [], [0]
    skeleton = _pack(tree, chunks, size)
    back = _unpack(skeleton, torch.cat(chunks))
    assert size[0] == sum(c.numel() for c in chunks)
    assert torch.equal(back["model"]["w"], tree["model"]["w"])
    assert back["optim"]["state"][0]["m"].dtype == torch.float16
    target = {"model": {"w": torch.zeros(3, 2), "b": torch.zeros(0), "i": torch.tensor(0)},
              "optim": {"state": {}, "param_groups": []}}
    w = target["model"]["w"]
    fill(target, back)
    assert target["model"]["w"] is w and torch.equal(w, tree["model"]["w"])  # copied into
    assert torch.equal(target["optim"]["state"][0]["step"], torch.tensor(3.0))
    assert target["optim"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert is_replicated(tree) and is_replicated({"p": torch.nn.Parameter(torch.ones(1))})


class OnePeer:
    rank, world_size, ctl_group = 0, 1, None

    def gather(self, value):
        return [value]


def test_peer_snapshots_keep_the_two_newest_and_check_the_config(tmp_path):
    peers = PeerState(OnePeer(), str(tmp_path / "peer"), every=2)
    seen = {"n": 0}

    def state():
        return {"sharded": {"model": {"w": torch.full((2,), float(seen["n"]))}},
                "data.json": {"samplesSeen": seen["n"]}}

    doc = {"configFingerprint": "abc", "phase": "train", "runId": "r"}
    for step in range(1, 8):
        seen["n"] = step
        peers.snapshot(step, state, doc)
        peers.snapshot(step, state, doc)  # asked twice at one boundary: written once
    assert peers._held() == [4, 6]  # every 2 steps, the 2 newest
    assert len(peers.seconds) == 3
    saved = torch.load(tmp_path / "peer" / "peer-step-0000000006.pt", weights_only=False)
    assert saved["ranks"] == [{"data.json": {"samplesSeen": 6}}]
    assert torch.equal(saved["sharded"]["model"]["w"], torch.full((2,), 6.0))
    assert peers._usable("abc", "train") == [4, 6]
    assert peers._usable("other-config", "train") == [] and peers._usable("abc", "eval") == []


def test_heartbeat_restore_fields_round_trip():
    beat = Heartbeat(attempt=3, rank=1, restored_from="peers", restored_step=0,
                     training_since=1700000000.5)
    data = json.loads(beat.to_json())
    assert (data["restoredFrom"], data["restoredStep"], data["trainingSince"]) == ("peers", 0, 1700000000.5)
    assert Heartbeat.from_json(beat.to_json()) == beat
    plain = Heartbeat.from_json(Heartbeat(attempt=1, rank=0).to_json())
    assert plain.restored_from == "" and plain.restored_step is None and plain.training_since is None


def test_rejoin_record():
    assert rejoin_record({}) == {}
    rec = rejoin_record({"PHOENIX_REJOIN_LOST_AT": "100.0", "PHOENIX_REJOIN_FROM_ATTEMPT": "2"},
                        now=lambda: 104.5)
    assert rec == {"fromAttempt": 2, "lostAt": 100.0, "secondsSinceLoss": 4.5, "how": "re-exec"}
    warm = rejoin_record({"PHOENIX_REJOIN_LOST_AT": "100.0", "PHOENIX_REJOIN_HOW": "warm"},
                         now=lambda: 101.0)
    assert warm == {"fromAttempt": 0, "lostAt": 100.0, "secondsSinceLoss": 1.0, "how": "warm"}


def test_a_rank_joining_a_superseded_attempt_follows_the_fence(tmp_path, monkeypatch):
    """A member lost while the gang was still joining moves the fence on: a rank carried into
    the newer attempt re-execs into it at once, one not carried exits as superseded, and the
    fence of its own attempt lets it go on gathering."""
    from phoenix_trainer import rejoin

    storage = open_storage(f"file://{tmp_path}/p")
    me = GangMember(members=3, member=1, local_rank=0, local_world_size=1, store_host="h",
                    store_port=1, store_member=0, attempt=2, pod="j.train-1.1")
    execs = []

    class Execd(Exception):
        pass

    def reexec(fence, *a):  # the real one never returns
        execs.append(fence.attempt)
        raise Execd

    monkeypatch.setattr(rejoin, "reexec_into", reexec)
    write_fence(storage, Fence(2, members=("j.train-1.0", "j.train-1.1", "j.train-2.2"),
                               store="h:1"))
    rejoin._follow_fence(me, storage)  # its own attempt: keep gathering
    assert execs == []
    write_fence(storage, Fence(3, members=("j.train-3.0", "j.train-1.1", "j.train-2.2"),
                               store="h2:2", store_member=1))
    with pytest.raises(Execd):
        rejoin._follow_fence(me, storage)
    assert execs == [3]
    write_fence(storage, Fence(4, members=("j.train-3.0", "j.train-4.1", "j.train-2.2"),
                               store="h2:3", store_member=2))
    with pytest.raises(SystemExit) as ended:
        rejoin._follow_fence(me, storage)
    assert ended.value.code == 143


# --- a spare member (recovery.standby with gangRestart: Member) ---------------------------
SPARE_ENV = {"PHOENIX_GANG_RESTART": "Member", "PHOENIX_GANG_MEMBERS": "3",
             "PHOENIX_ROLE": "spare", "PHOENIX_ATTEMPT": "2", "PHOENIX_POD_NAME": "j.train-2.spare",
             "PHOENIX_JOB_UID": "u-1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
TAKEN = Fence(3, "j.train-2.spare", uid="u-1", resume_from="s3://b/p/train/step-00000040",
              members=("j.train-1.0", "j.train-2.spare", "j.train-1.2"),
              store="train-0.svc.ns.svc:29503", store_member=0)


def _place(storage, clock, stopped=lambda: False, uid="u-1"):
    from phoenix_trainer.rejoin import wait_for_place
    return wait_for_place(storage, pod="j.train-2.spare", uid=uid, stopped=stopped,
                          sleep=clock.sleep)


def test_a_spare_waits_through_fences_that_do_not_name_it(tmp_path):
    from phoenix_trainer.rejoin import is_spare
    assert is_spare(SPARE_ENV) and not is_spare({**SPARE_ENV, "PHOENIX_ROLE": "standby"})
    assert not is_spare({**SPARE_ENV, "PHOENIX_GANG_RESTART": "Whole"})
    with pytest.raises(ValueError, match="PHOENIX_GANG_STORE"):
        GangMember.from_env(SPARE_ENV)  # no place in a group until a fence gives it one
    storage = open_storage(f"file://{tmp_path}/p")
    polls = iter([
        None,  # no fence yet
        Fence(3, "j.train-3.1", uid="u-1", members=("j.train-1.0", "j.train-3.1", "j.train-1.2")),
        TAKEN])  # a member replaced by a new pod: not the spare's business; then its place

    class Operator(FakeClock):
        def sleep(self, s):  # between two polls, the operator writes the next fence
            super().sleep(s)
            fence = next(polls)
            if fence is not None:
                write_fence(storage, fence)
    assert _place(storage, clock := Operator()) == (CARRIED, TAKEN)
    assert clock.now == pytest.approx(1.5)  # three polls, 0.5 s apart


def test_a_spare_ends_on_another_job_s_fence_or_a_stop(tmp_path):
    storage = open_storage(f"file://{tmp_path}/p")
    clock = FakeClock()
    foreign = Fence(9, "other", uid="u-2", members=("j.train-2.spare",))
    write_fence(storage, foreign)
    assert _place(storage, clock) == (SUPERSEDED, foreign)
    write_fence(storage, TAKEN)
    assert _place(storage, clock, stopped=lambda: True) == (STOPPED, None)


def test_the_place_sets_the_member_s_environment():
    from phoenix_trainer.rejoin import place_env
    env = {**SPARE_ENV, **place_env(TAKEN, "j.train-2.spare", 1000.0, 12.5)}
    me = GangMember.from_env(env)
    assert (me.member, me.attempt, me.rank, me.world_size) == (1, 3, 2, 6)
    assert (me.store_host, me.store_port, me.store_member) == ("train-0.svc.ns.svc", 29503, 0)
    assert env["PHOENIX_ROLE"] == "active" and env["PHOENIX_RESUME_FROM"] == TAKEN.resume_from
    assert env["PHOENIX_SPARE_WAITED_SECONDS"] == "12.500"


def test_take_place_serves_readiness_while_waiting_and_becomes_the_member(tmp_path):
    import threading
    import urllib.request

    from phoenix_trainer.rejoin import take_place
    import socket
    storage = open_storage(f"file://{tmp_path}/p")
    with socket.socket() as s:  # a free port, served while the spare waits
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    port_env = {**SPARE_ENV, "PHOENIX_STATUS_PORT": str(port)}
    seen: list[int] = []

    def operator():
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                    seen.append(r.status)
                    break
            except OSError:
                threading.Event().wait(0.05)
        write_fence(storage, TAKEN)

    t = threading.Thread(target=operator)
    t.start()
    assert take_place(port_env, storage, poll=0.02) == 1
    t.join()
    assert seen == [200]  # Ready while it waited: warm
    assert (port_env["PHOENIX_GANG_MEMBER"], port_env["PHOENIX_ATTEMPT"]) == ("1", "3")
    assert port_env["PHOENIX_GANG_STORE"] == TAKEN.store
    with pytest.raises(OSError):  # the wait's server is gone: the session serves it next
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1)


def test_take_place_exits_as_preempted_on_sigterm(tmp_path):
    import os
    import signal
    import threading

    from phoenix_trainer.rejoin import take_place
    storage = open_storage(f"file://{tmp_path}/p")
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(SystemExit) as ended:
        take_place(dict(SPARE_ENV), storage, poll=0.02)
    assert ended.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handler is back
