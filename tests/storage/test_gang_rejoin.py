"""In-place gang recovery (``recovery.gangRestart: Member``) without Kubernetes: three
"members" (real processes, each with the environment its pod would get: standalone, one rank,
``PHOENIX_GANG_*``, a peer directory of its own), file:// checkpoint storage, and this test
writing ``fence.json`` the way the operator does.

One run loses member 2 (SIGKILL), then member 0 (the host of the group's store), which is
asked to stop (SIGTERM, as an eviction does) and leaves the gang alone. After each
loss the test fences the next attempt with the survivors' pods and a replacement: for the
first, a spare (``PHOENIX_ROLE=spare``, ``recovery.standby``) started beforehand and waiting
warm, which the fence names for member 2; for the second, a new process. It asserts that the
survivors went on in their warm copies (warm.py: a new PID under the process that was
launched, which stays and reports the copy's exit status), that every rank restored from its peers at the step the survivors reached (no checkpoint exists
before the final one: 0 steps lost without an emergency checkpoint), that the heartbeats say
so, and that the final weights equal an undisturbed 3-member run's, tensor for tensor (DDP
with ``exact_allreduce_hook``).

No S3 server is needed (file://), but it starts 8 trainer processes: about 60 s on 2 cores,
hence ``slow`` in the storage layer (``make test`` runs it).
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from phoenix_trainer.core.handshake import Fence, write_fence
from phoenix_trainer.core.heartbeat import Heartbeat, heartbeat_key
from phoenix_trainer.core.layout import list_checkpoints
from phoenix_trainer.core.storage import open_storage
from trainer_procs import Proc, free_port, gang_state, tensors_equal

pytestmark = [pytest.mark.storage, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_distributed.py"
STEPS = 40
ARGS = ["--steps", str(STEPS), "--log-every", "1", "--step-delay", "0.05", "--global-batch", "24"]
RESUMED = re.compile(r"rank (\d+)/3\] resuming run \S+ attempt (\d+) at step (\d+) .*restored from"
                     r" (\w+), pid (\d+)")
REJOINED = re.compile(r"rejoined ([0-9.]+)s after the loss in attempt \d+ \(([\w-]+)\)")


def pod(attempt: int, member: int) -> str:
    return f"j.train-{attempt}.{member}"


class Gang:
    """A Member-mode gang of 3 one-rank members under ``uri``; the test plays the operator."""

    def __init__(self, tmp: Path, uri: str, args: list[str] = ARGS, interval: int = 1000) -> None:
        """``interval``: checkpoint steps (by default only the final checkpoint: a restore at
        any other step came from the peers)."""
        self.tmp, self.uri, self.storage = tmp, uri, open_storage(uri)
        self.args, self.interval = args, interval
        self.members: list[str] = []
        self.procs: dict[str, Proc] = {}

    def fence(self, attempt: int, members: list[str], store_member: int) -> str:
        store = f"127.0.0.1:{free_port()}"
        write_fence(self.storage, Fence(attempt, members[store_member], members=tuple(members),
                                        store=store, store_member=store_member))
        self.members = members
        return store

    def start(self, member: int | None, attempt: int, store: str, store_member: int) -> Proc:
        """``member`` None: a spare, waiting for the fence to give it a place."""
        name = pod(attempt, member) if member is not None else f"j.train-{attempt}.spare"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "AWS_"))}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update({
            "PYTHONPYCACHEPREFIX": str(Path.home() / ".cache" / "phoenix" / "pycache"),
            "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "PHOENIX_GANG_RESTART": "Member", "PHOENIX_GANG_MEMBERS": "3",
            "PHOENIX_GANG_MEMBER": str(member), "PHOENIX_GANG_STORE": store,
            "PHOENIX_GANG_STORE_MEMBER": str(store_member), "PHOENIX_ATTEMPT": str(attempt),
            "PHOENIX_POD_NAME": name, "PHOENIX_PEER_DIR": str(self.tmp / "peer" / name),
            "PHOENIX_CHECKPOINT_URI": self.uri, "PHOENIX_PHASE": "train",
            "PHOENIX_JOB_NAME": "j", "PHOENIX_JOB_NAMESPACE": "tests",
            "PHOENIX_CHECKPOINT_INTERVAL_STEPS": str(self.interval), "PHOENIX_HEARTBEAT_SECONDS": "0.5",
            "PHOENIX_COLLECTIVE_TIMEOUT_SECONDS": "30",
            "PHOENIX_TERMINATION_LOG": str(self.tmp / f"termination-{name}")})
        if member is None:
            for key in ("PHOENIX_GANG_MEMBER", "PHOENIX_GANG_STORE", "PHOENIX_GANG_STORE_MEMBER"):
                del env[key]
            env["PHOENIX_ROLE"] = "spare"
        proc = self.procs[name] = Proc(env, SCRIPT, self.args)
        return proc

    def launch(self) -> None:
        store = self.fence(1, [pod(1, m) for m in range(3)], 0)
        for m in range(3):
            self.start(m, 1, store, 0)

    def lines(self) -> list[str]:
        return [line for p in self.procs.values() for line in p.lines]

    def resumes(self) -> dict[int, list[tuple[int, int, str, int]]]:
        """attempt -> (rank, step, restored from, pid) of every rank's resume line."""
        out: dict[int, list[tuple[int, int, str, int]]] = {}
        for line in self.lines():
            if m := RESUMED.search(line):
                rank, attempt, step, source, pid = m.groups()
                out.setdefault(int(attempt), []).append((int(rank), int(step), source, int(pid)))
        return out


def wait_for_line(proc: Proc, *parts: str, timeout: float = 180) -> None:
    """Until a line of ``proc``'s output holds every one of ``parts`` (it must stay alive)."""
    deadline = time.monotonic() + timeout
    while not any(all(p in line for p in parts) for line in proc.lines):
        assert time.monotonic() < deadline and proc.p.poll() is None, "".join(proc.lines[-20:])
        time.sleep(0.05)


def test_lost_members_are_replaced_in_place_and_restore_from_peers(tmp_path):
    run, ref = Gang(tmp_path / "run", f"file://{tmp_path}/run/ckpt/train"), \
        Gang(tmp_path / "ref", f"file://{tmp_path}/ref/ckpt/train")
    ref.launch()
    run.launch()
    m0, m1, m2 = (run.procs[pod(1, m)] for m in range(3))
    pids = {m: p.p.pid for m, p in enumerate((m0, m1, m2))}

    # The spare (its own attempt number, 2, reserved): torch imported, waiting on the fence.
    new2 = run.start(None, 2, "", 0)
    wait_for_line(new2, "waiting for a member's place")

    # Loss 1: member 2 (SIGKILL). Attempt 3 carries members 0 and 1, and the spare as 2.
    m0.wait_for_step(10, timeout=180)
    reached_1 = m0.step
    os.kill(pids[2], signal.SIGKILL)
    assert m2.finish(timeout=30) == -signal.SIGKILL
    store = run.fence(3, [pod(1, 0), pod(1, 1), "j.train-2.spare"], 0)

    # Loss 2: member 0, the store's host, asked to stop (SIGTERM: an eviction). It leaves
    # alone at the next step boundary (no emergency checkpoint: its peers hold the state),
    # exiting as preempted. Attempt 3: member 1 (the lowest survivor) hosts the store.
    wait_for_line(m0, "resuming run", "attempt 3 at step")
    m0.wait_for_step(reached_1 + 10, timeout=180)
    reached_2 = m0.step
    os.kill(pids[0], signal.SIGTERM)
    assert m0.finish(timeout=30) == 143, "".join(m0.lines[-20:])
    said = json.loads((tmp_path / "run" / f"termination-{pod(1, 0)}").read_text())
    assert said["reason"] == "preempted" and "leaves the gang" in said["message"], said
    store = run.fence(4, [pod(4, 0), pod(1, 1), "j.train-2.spare"], 1)
    new0 = run.start(0, 4, store, 1)

    for p in (m1, new2, new0, *ref.procs.values()):
        assert p.finish(timeout=240) == 0, "".join(p.lines[-30:])

    by_attempt = run.resumes()
    print(f"resumes by attempt: {by_attempt}; losses at steps >= {reached_1}, {reached_2}")
    for attempt, reached in ((3, reached_1), (4, reached_2)):
        got = sorted(by_attempt[attempt])
        assert [r for r, *_ in got] == [0, 1, 2], got
        steps = {s for _, s, _, _ in got}
        # The step the survivors reached: rank 0 logs step N before the gang agrees on it, so
        # the newest step every rank agreed on is N - 1 if the kill came in between.
        assert len(steps) == 1 and steps.pop() >= reached - 1, got
        assert {src for _, _, src, _ in got} == {"peers"}, got
    # The survivors went on in their warm copies (new PIDs), each a child of the process that
    # was launched (which stayed as its supervisor: SIGTERM to pids[0] reached the copy above,
    # and its 143 came back); the spare took member 2's place in the process that waited.
    survivors_3 = {pid for r, _, _, pid in by_attempt[3] if r in (0, 1)}
    assert survivors_3.isdisjoint(pids.values()) and len(survivors_3) == 2, by_attempt
    assert [pid for r, _, _, pid in by_attempt[3] if r == 2] == [new2.p.pid]
    survivors_4 = {pid for r, _, _, pid in by_attempt[4] if r in (1, 2)}
    assert survivors_4.isdisjoint(survivors_3 | {new2.p.pid, pids[1]}), by_attempt
    assert any("spare pod j.train-2.spare takes member 2's place in attempt 3" in line
               for line in new2.lines)

    # Only the final checkpoint exists: nothing was restored from (or saved for) a loss.
    assert [c.step for c in list_checkpoints(run.storage)] == [STEPS]
    # Replicated state comes back from peers: no pod kept a copy of its DCP objects.
    assert [p for p in (tmp_path / "run" / "peer").rglob("*") if "dcp-own" in p.parts and p.is_file()] == []
    for rank in range(3):
        beat = Heartbeat.from_json(run.storage.get_bytes(heartbeat_key(4, rank)))
        assert beat.restored_from == "peers" and beat.restored_step == by_attempt[4][0][1], beat
        assert beat.training_since and beat.step == STEPS, beat
    metrics = run.storage.get_bytes("metrics/attempt-4.jsonl").decode().splitlines()
    start = next(json.loads(line) for line in metrics if '"resume"' in line)
    assert start["restoredFrom"] == "peers", start

    assert tensors_equal(gang_state(run.uri, tmp_path, STEPS), gang_state(ref.uri, tmp_path, STEPS)), \
        "weights differ from the undisturbed gang's"
    rejoin = [(float(m.group(1)), m.group(2)) for line in run.lines() if (m := REJOINED.search(line))]
    print(f"survivors: loss -> training again (warm copy, new group, restore): {rejoin} s")
    assert len(rejoin) == 4, rejoin  # 2 survivors x 2 losses (the spare did not re-exec)
    assert {how for _, how in rejoin} == {"warm"}, rejoin


FSDP_STEPS = 60
FSDP_ARGS = ["--mode", "fsdp", "--hidden", "512", "--steps", str(FSDP_STEPS), "--log-every", "1", "--step-delay",
             "0.05", "--global-batch", "24"]
SHARD_READ = re.compile(r"read ([0-9.]+) MB of checkpoint \S+ sharded state .*?"
                        r"(?:, and ([0-9.]+) MB from this pod's copies of \d+ of them)?$")


def wait_for_checkpoint(gang: Gang, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(c.step >= step for c in list_checkpoints(gang.storage)):
        assert time.monotonic() < deadline, f"no checkpoint at step {step}"
        time.sleep(0.1)


def test_a_sharded_gang_rolls_back_in_place_and_survivors_reread_only_their_own_copies(tmp_path):
    """FSDP2 (sharded state: nothing to copy from a peer), Member mode, 3 one-rank members
    checkpointing every 10 steps. Member 1 is SIGKILLed after the checkpoint at step 10, then
    member 0 (rank 0, the store's host) after the one at 30; each time a new process takes the
    lost member's place. Every rank of the next attempt restores from the newest checkpoint
    (``restored from checkpoint``); the survivors, in their warm copies, read their own shard
    from the copy their pod kept (shard_cache.py) and almost nothing from storage, while the
    newcomer reads its shard from storage. The final weights equal an undisturbed gang's."""
    run = Gang(tmp_path / "run", f"file://{tmp_path}/run/ckpt/train", FSDP_ARGS, interval=10)
    ref = Gang(tmp_path / "ref", f"file://{tmp_path}/ref/ckpt/train", FSDP_ARGS, interval=10)
    ref.launch()
    run.launch()
    m0, m1, m2 = (run.procs[pod(1, m)] for m in range(3))

    wait_for_checkpoint(run, 10)
    m0.wait_for_step(12, timeout=180)
    m1.p.kill()
    assert m1.finish(timeout=30) == -signal.SIGKILL
    store = run.fence(2, [pod(1, 0), pod(2, 1), pod(1, 2)], 0)
    new1 = run.start(1, 2, store, 0)

    wait_for_line(m0, "resuming run", "attempt 2 at step")
    wait_for_checkpoint(run, 30)
    m0.wait_for_step(32, timeout=180)
    m0.p.kill()  # the launched process: its warm copy dies with it (PR_SET_PDEATHSIG)
    assert m0.finish(timeout=30) == -signal.SIGKILL
    store = run.fence(3, [pod(3, 0), pod(2, 1), pod(1, 2)], 1)
    new0 = run.start(0, 3, store, 1)

    for p in (m2, new1, new0, *ref.procs.values()):
        assert p.finish(timeout=240) == 0, "".join(p.lines[-30:])

    by_attempt = {a: [(rank, step, source) for rank, step, source, _ in got]
                  for a, got in run.resumes().items()}
    print(f"resumes by attempt: {by_attempt}")
    assert sorted(by_attempt[2]) == [(r, 10, "checkpoint") for r in range(3)], by_attempt
    assert sorted(by_attempt[3]) == [(r, 30, "checkpoint") for r in range(3)], by_attempt

    def reads(proc: Proc) -> list[tuple[float, float]]:
        """(MB from storage, MB from the pod's copies) of each sharded restore it logged."""
        return [(float(m.group(1)), float(m.group(2) or 0)) for line in proc.lines
                if (m := SHARD_READ.search(line.rstrip()))]

    print(f"sharded reads (storage MB, local MB): m0 {reads(m0)}, m2 {reads(m2)}, "
          f"new1 {reads(new1)}, new0 {reads(new0)}")
    def own_copy(read: tuple[float, float]) -> bool:  # its shard from its pod, ~0 from storage
        return read[1] > 0 and read[0] < read[1] / 4

    def from_storage(read: tuple[float, float]) -> bool:  # a new pod has no copies
        return read[1] == 0 and read[0] > 0

    # m0 survived loss 1; m2 both; new1 joined at loss 1 and survived loss 2; new0 joined last
    assert [own_copy(r) for r in reads(m0)] == [True], reads(m0)
    assert [own_copy(r) for r in reads(m2)] == [True, True], reads(m2)
    assert [from_storage(r) for r in reads(new1)] == [True, False], reads(new1)
    assert own_copy(reads(new1)[1]), reads(new1)
    assert [from_storage(r) for r in reads(new0)] == [True], reads(new0)
    assert tensors_equal(gang_state(run.uri, tmp_path, FSDP_STEPS),
                         gang_state(ref.uri, tmp_path, FSDP_STEPS)), \
        "weights differ from the undisturbed gang's"
