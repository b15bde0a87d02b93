"""Gangs of ranks under torchrun (gloo on CPU) against the local S3 server: one sharded
checkpoint for all ranks, a coordinated stop, exact resume, and resharding.

- 2 ranks, DDP and FSDP2: one rank SIGKILLed at a seeded step (the other exits promptly,
  nothing left running), the newest checkpoint then damaged in one rank's shard (it must
  not be resumed from), one rank SIGTERMed (all ranks stop at the same step and save one
  emergency checkpoint together), resumed to the end: the final model and optimizer equal
  the uninterrupted 2-rank run's, tensor for tensor. Nothing is spooled on local disk on the
  way (DCP streams to S3), and a resumed rank reads its own shard of the sharded state, not
  every rank's.
- DDP on 4 ranks preempted and resumed: bit-exact too (the example's exact_allreduce_hook).
- FSDP2 checkpoint of 4 ranks resumed on 2: training continues on exactly the same samples
  and the loss curve stays within tolerance of the 4-rank run's.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest

from phoenix_trainer.core.layout import latest_valid_checkpoint, list_checkpoints, step_dir_name
from phoenix_trainer.core.storage import open_storage
from trainer_procs import (
    DiskWatch, Proc, env_for, first_checkpoint_landed, gang_state, kill_and_resume, tensors_equal,
)

pytestmark = [pytest.mark.storage, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_distributed.py"
STEPS = 40
ARGS = ["--steps", str(STEPS), "--log-every", "1", "--step-delay", "0.03"]
ENV = {"PHOENIX_CHECKPOINT_INTERVAL_STEPS": "5", "PHOENIX_COLLECTIVE_TIMEOUT_SECONDS": "20"}


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


# full for DDP: make test kills DDP gangs on the lab (test_gang) and here in test_gang_rejoin
@pytest.mark.parametrize("mode", [pytest.param("ddp", marks=pytest.mark.full), "fsdp"])
def test_gang_killed_damaged_and_stopped_resumes_bit_exact(s3_server, s3_env, s3_bucket, tmp_path, mode):
    seed = int(os.environ.get("PHOENIX_TEST_SEED", time.time_ns() % 10_000))
    print(f"kill schedule seed {seed} (set PHOENIX_TEST_SEED to replay)")
    rng = random.Random(seed)
    run_uri, ref_uri = f"{s3_bucket.uri}/{mode}/train", f"{s3_bucket.uri}/{mode}-ref/train"
    plan = [(signal.SIGKILL, rng.randint(12, 18)), (signal.SIGTERM, rng.randint(24, 30))]
    victims = [rng.randrange(2), rng.randrange(2)]
    damaged: list[int] = []
    reads: list[tuple[float, float]] = []  # (MB a rank read, MB of the biggest rank's shard)

    def target(proc: Proc, attempt: int) -> int:
        return proc.pids[victims[attempt]]

    def between(proc: Proc, attempt: int) -> None:
        survivors = [pid for rank, pid in proc.pids.items() if rank != victims[attempt]]
        assert all(gone(pid) for pid in survivors), "a member of the dead gang is still running"
        if attempt == 0:  # damage one rank's shard of the newest checkpoint
            storage = open_storage(run_uri)
            newest = latest_valid_checkpoint(storage)
            key = f"{step_dir_name(newest.step)}/dcp-__1_0.distcp"
            body = bytearray(storage.get_bytes(key))
            body[len(body) // 2] ^= 0x10
            storage.put_bytes(key, bytes(body))
            damaged.append(newest.step)
        else:  # a resumed gang: what each rank read of the sharded state
            files = open_storage(run_uri).get_bytes(f"{step_dir_name(proc.start_step)}/manifest.json")
            sizes = {n: e["size"] for n, e in json.loads(files)["files"].items() if n.startswith("dcp-")}
            meta = sizes.pop("dcp-.metadata") + sizes.pop("dcp-.blocks.json")
            reads.extend((float(m.group(1)), (max(sizes.values()) + meta) / 1e6)
                         for line in proc.lines if (m := READ.search(line)))

    spool = tmp_path / "spool"
    with DiskWatch(spool, every=0.02) as watch:
        starts = kill_and_resume(s3_server, tmp_path, SCRIPT, [*ARGS, "--mode", mode, "--seed", str(seed % 5)],
                                 run_uri, ref_uri, plan, nproc=2, target=target, between=between,
                                 # the damage below must leave an older valid checkpoint than the newest
                                 ready=first_checkpoint_landed(run_uri, 10),
                                 expect_rc={signal.SIGKILL: 1, signal.SIGTERM: 1},
                                 PHOENIX_SPOOL_DIR=str(spool), **ENV)
    assert watch.peak == 0, f"{watch.peak} bytes spooled"
    assert len(reads) == 2 and all(got > 0 for got, _ in reads), reads
    if mode == "fsdp":  # DDP's state is replicated: every rank needs all of it
        assert all(got <= shard + 0.05 for got, shard in reads), reads
    print(f"resumed at steps {starts}; damaged checkpoint step {damaged}")
    assert 0 < starts[0] < damaged[0], "the damaged checkpoint was resumed from"
    assert starts[1] > plan[1][1] - 1  # the emergency checkpoint of the SIGTERM'd gang
    assert tensors_equal(gang_state(run_uri, tmp_path, STEPS), gang_state(ref_uri, tmp_path, STEPS)), \
        f"{mode}: weights differ after resumes at {starts} (seed {seed})"
    steps = [c.step for c in list_checkpoints(open_storage(run_uri))]
    assert steps[-1] == STEPS


@pytest.mark.skipif(os.environ.get("PHOENIX_S3_SLOW_ON_ALL", "") not in ("1", "true"),
                    reason="4 ranks resumed bit-exact is what tests/e2e/test_gang.py checks on the"
                           " lab (2 pods x 2 ranks, the same hook); here in make test-storage-all")
def test_ddp_on_4_ranks_resumes_bit_exact(s3_server, s3_env, s3_bucket, tmp_path):
    """With more than 2 ranks the sum of a ring all-reduce depends on the bucket layout, which
    DDP rebuilds after the first iteration (and a resumed run's first iteration uses the initial
    one again); the example's exact_allreduce_hook makes the average layout-independent."""
    args = [*ARGS, "--mode", "ddp", "--step-delay", "0"]
    ref, run = f"{s3_bucket.uri}/ddp4-ref/train", f"{s3_bucket.uri}/ddp4/train"
    (tmp_path / "ref").mkdir()
    procs = [Proc(env_for(s3_server, ref, 0, tmp_path / "ref", **ENV), SCRIPT, args, nproc=4),
             Proc(env_for(s3_server, run, 0, tmp_path, **ENV), SCRIPT, [*args, "--preempt-at", "17"], nproc=4)]
    assert [p.finish(timeout=300) for p in procs] == [0, 1], "".join(procs[1].lines[-20:])
    last = Proc(env_for(s3_server, run, 1, tmp_path, **ENV), SCRIPT, args, nproc=4)
    assert last.finish(timeout=300) == 0 and last.start_step == 17, "".join(last.lines[-20:])
    assert tensors_equal(gang_state(run, tmp_path, STEPS), gang_state(ref, tmp_path, STEPS))


READ = re.compile(r"read ([0-9.]+) MB of checkpoint (\S+)'s sharded state")


LOSS = re.compile(r"phoenix\.example: step (\d+) loss ([0-9.]+)")


def losses(proc: Proc) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for line in proc.lines if (m := LOSS.search(line))}


# full: resharding 4 ranks to 2 (test_dcp_storage reads a plan's blocks in make test)
@pytest.mark.full
def test_fsdp_checkpoint_of_4_ranks_resumes_on_2(s3_server, s3_env, s3_bucket, tmp_path):
    args = [*ARGS, "--mode", "fsdp", "--step-delay", "0"]
    four, two = f"{s3_bucket.uri}/four/train", f"{s3_bucket.uri}/four-then-two/train"
    (tmp_path / "ref").mkdir()
    ref = Proc(env_for(s3_server, four, 0, tmp_path / "ref", **ENV), SCRIPT, args, nproc=4)
    assert ref.finish(timeout=300) == 0, "".join(ref.lines[-20:])
    first = Proc(env_for(s3_server, two, 0, tmp_path, **ENV), SCRIPT, [*args, "--preempt-at", "20"],
                 nproc=4)  # the first half on 4 ranks, then a preemption
    assert first.finish(timeout=300) == 1, "".join(first.lines[-20:])
    second = Proc(env_for(s3_server, two, 1, tmp_path, **ENV), SCRIPT, args, nproc=2)
    assert second.finish(timeout=300) == 0, "".join(second.lines[-20:])
    assert second.start_step == 20
    storage = open_storage(two)
    info = latest_valid_checkpoint(storage)
    seen = json.loads(storage.get_bytes(f"{step_dir_name(STEPS)}/rank0-data.json"))
    assert info.step == STEPS and seen == {"samplesSeen": STEPS * 32, "worldSize": 2}
    want, got = losses(ref), losses(second)
    # Each rank's dropout stream is its own, so the 2-rank half draws other masks than the
    # 4-rank run did: compare the smoothed curve (mean over the last 10 steps), not steps.
    tail = range(STEPS - 9, STEPS + 1)
    w, g = sum(want[s] for s in tail) / 10, sum(got[s] for s in tail) / 10
    print(f"mean loss over steps {tail.start}-{STEPS}: 4 ranks {w:.5f}, 4 then 2 ranks {g:.5f}"
          f" ({abs(g - w) / w:.2%} apart); at step 20: {want[20]:.5f}")
    assert abs(g - w) / w < 0.05, (want, got)
    assert g < want[20]  # training went on from where the 4 ranks left it


def test_standby_gang_promoted_by_the_fence_resumes_bit_exact(s3_server, s3_env, s3_bucket, tmp_path):
    """A standby gang (2 ranks, PHOENIX_ROLE=standby) waits beside the active gang, each rank
    preloading its own part of the newest checkpoint with no collective; the active gang is
    preempted at step 17 (emergency checkpoint); one fence write promotes the standby gang,
    whose ranks resume from memory and finish with the weights of an undisturbed gang. A
    second standby gang SIGTERMed while waiting ends as preempted, having written nothing."""
    from phoenix_trainer.core.contract import TerminationMessage
    from phoenix_trainer.core.handshake import Fence, write_fence

    args = [*ARGS, "--mode", "ddp", "--step-delay", "0.02"]
    ref, run = f"{s3_bucket.uri}/sb-ref/train", f"{s3_bucket.uri}/sb/train"
    (tmp_path / "ref").mkdir()
    waiting = {"PHOENIX_ROLE": "standby", "PHOENIX_CONTROL_POLL_SECONDS": "0.1"}
    undisturbed = Proc(env_for(s3_server, ref, 0, tmp_path / "ref", **ENV), SCRIPT, args, nproc=2)
    active = Proc(env_for(s3_server, run, 0, tmp_path, **ENV), SCRIPT,
                  [*args, "--preempt-at", "17"], nproc=2)
    standby = Proc(env_for(s3_server, run, 1, tmp_path, **ENV, **waiting), SCRIPT, args, nproc=2)
    stopped = Proc(env_for(s3_server, run, 2, tmp_path, **ENV, **waiting), SCRIPT, args, nproc=2)
    assert active.finish(timeout=300) == 1, "".join(active.lines[-20:])
    held = "holding checkpoint step 17 in memory"  # each rank: its own part
    deadline = time.monotonic() + 60
    while sum(held in line for line in standby.lines) < 2:  # both ranks, each its own part
        assert standby.p.poll() is None, "".join(standby.lines[-30:])
        assert time.monotonic() < deadline, "".join(standby.lines[-30:])
        time.sleep(0.1)
    assert standby.start_step is None  # still waiting: the fence names attempt 0
    storage = open_storage(run)
    write_fence(storage, Fence(1, "standby", "now", resume_from=f"{run}/{step_dir_name(17)}"))
    assert standby.finish(timeout=300) == 0, "".join(standby.lines[-30:])
    assert standby.start_step == 17
    assert sum("resuming from the preloaded checkpoint step 17" in line
               for line in standby.lines) == 2, "".join(standby.lines[-30:])
    assert undisturbed.finish(timeout=300) == 0, "".join(undisturbed.lines[-20:])
    assert tensors_equal(gang_state(run, tmp_path, STEPS), gang_state(ref, tmp_path, STEPS))

    assert stopped.p.poll() is None, "".join(stopped.lines[-30:])  # attempt 2 still waits
    os.kill(stopped.p.pid, signal.SIGTERM)
    assert stopped.finish(timeout=120) != 0
    assert sum("before it was promoted" in line for line in stopped.lines) >= 2  # every rank
    msg = TerminationMessage.from_json((tmp_path / "termination-2").read_text())
    assert msg.reason == "preempted" and "before it was promoted" in msg.message, msg
    writers = {json.loads(storage.get_bytes(f"{step_dir_name(c.step)}/manifest.json")).get("attempt")
               for c in list_checkpoints(storage)}
    assert 2 not in writers, writers
