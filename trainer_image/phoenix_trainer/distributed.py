"""Phoenix under torchrun: one checkpoint for all ranks, one stop for all ranks.

``DistributedSession`` is a ``Session`` for a process group of any size (gloo on CPU, NCCL
on GPUs; torchrun's environment), built with the group's parts instead of one process's:
``GroupPeers`` (the collective decisions), ``ShardedSnapshots`` (per-rank names, DCP),
``GangCommit`` (one manifest for every rank's files) and ``RankLoader`` (a rank's part of a
checkpoint); it overrides none of the session's methods. What changes against one process:

- **Agreement.** At each step boundary the ranks agree, in one tiny all-reduce, whether to
  stop (SIGTERM reached any rank) and whether to checkpoint (the interval is due on any
  rank), so every rank stops or saves at the same step. The emergency save is made by all
  ranks or by none. Bookkeeping runs on its own gloo groups (one for the training thread,
  one for the upload thread), never on the model's (possibly NCCL) group, with a bounded
  timeout (``PHOENIX_COLLECTIVE_TIMEOUT_SECONDS``, default 60): a rank lost without a word
  makes the others fail promptly instead of hanging until the grace period runs out.
- **Sharded checkpoints.** The state entry ``"sharded"`` (e.g. ``{"model": msd, "optim":
  osd}`` from ``torch.distributed.checkpoint.state_dict.get_state_dict``, for DDP or FSDP2)
  is staged on the training thread (CPU buffers reused from save to save: the blocking
  part) and written with ``torch.distributed.checkpoint`` from the upload thread, each
  rank's shard streamed straight to storage (``dcp_storage.StorageWriter``: no local spool).
  Everything else in the state is per rank, as ``step-N/rank<r>-<name>`` (RNG states, data
  position, trainer.json); DCP's objects are ``step-N/dcp-<name>`` (checkpoint file names
  are flat). The upload threads then exchange their files' sizes and sha256; rank 0 writes
  the one manifest listing every rank's files, last, after the fence check, and tells the
  others. A checkpoint missing any rank's file has no manifest (or fails verification) and
  is never resumed from, exactly like a partial single-process one.
- **Restore.** Rank 0 picks the candidate (newest valid, or ``PHOENIX_RESUME_FROM``) and
  broadcasts it; every rank reads and verifies its own files and checks the DCP objects are
  the uploaded ones (``dcp_storage.vouch_files``); if any rank fails, all fall back to the
  previous checkpoint together. ``Restored.load_sharded`` then loads with DCP, reading only
  the byte ranges this rank's load plan needs (``dcp_storage.StorageReader``), and
  reshards: a checkpoint written by 4 ranks loads on 2. Per-rank state of a rank that did
  not exist at save time comes from rank 0 (RNG streams then differ: exact in samples seen,
  not bitwise — see docs/trainer.md).
"""
from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from .checkpoint import Snapshot, load_checkpoint
from .checkpointing import LocalSnapshots
from .core.contract import ENV_PEER_DIR
from .core.errors import CheckpointError, StorageError, SupersededError
from .core.layout import CheckpointInfo, Manifest, step_dir_name
from .core.storage import ReadConfig, Storage
from .core.writer import publish_manifest, upload_shards
from .dcp_storage import DCP_PREFIX, Staged, Staging, StorageReader, StorageWriter, vouch_files
from .dcp_storage import load as dcp_load
from .dcp_storage import local_nbytes  # noqa: F401 - re-exported: its home before dcp_storage
from .dcp_storage import save as dcp_save
from . import prefetch as prefetch_mod
from . import warm
from .progress import note_collective
from .rejoin import GangMember, PeerState, Rejoin, init_group, is_replicated, is_spare, take_place
from .restore import Restored
from .session import Session
from .shard_cache import ShardCache

T = TypeVar("T")

ENV_COLLECTIVE_TIMEOUT = "PHOENIX_COLLECTIVE_TIMEOUT_SECONDS"
DEFAULT_COLLECTIVE_TIMEOUT = 60.0
SHARDED = "sharded"  # the state entry written with torch.distributed.checkpoint


def rank_prefix(rank: int) -> str:
    return f"rank{rank}-"


def init_from_env(backend: str | None = None, timeout_seconds: float | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1)
    if nobody did; returns whether this process is part of a group of more than one.

    In an in-place gang (``PHOENIX_GANG_RESTART=Member``) torchrun runs standalone in each pod
    and the GLOBAL group is built from ``PHOENIX_GANG_MEMBER``/``LOCAL_RANK``/
    ``LOCAL_WORLD_SIZE`` at the attempt's store (``rejoin.init_group``). A spare member
    (``PHOENIX_ROLE=spare``) first waits here, warm, for the place a fence gives it
    (``rejoin.take_place``)."""
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if is_spare():  # a spare member: wait warm until a fence gives it a member's place
        take_place()
    member = GangMember.from_env()
    if member is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=collective_timeout(timeout_seconds))
    if member is not None:  # an in-place gang: the global group is ours (rejoin.py)
        if warm.fork():  # this is the warm copy, handed a later attempt by its parent
            prefetch_mod.adopt()  # the parent's start-up download is not this process's
            member = GangMember.from_env()
            assert member is not None
        init_group(member, backend, timeout)
        return member.world_size > 1
    dist.init_process_group(backend, timeout=timeout)
    return True


def collective_timeout(seconds: float | None = None) -> float:
    if seconds is not None:
        return float(seconds)
    raw = os.environ.get(ENV_COLLECTIVE_TIMEOUT)
    try:
        return float(raw) if raw else DEFAULT_COLLECTIVE_TIMEOUT
    except ValueError:
        raise ValueError(f"{ENV_COLLECTIVE_TIMEOUT}={raw!r} is not a number of seconds") from None


def exact_allreduce_hook(process_group, bucket):  # unannotated: DDP checks the annotations
    """A DDP communication hook whose gradient average does not depend on the bucket layout.

    DDP lays gradients out in buckets, and after the first iteration it rebuilds them in the
    order the gradients became ready; a resumed run's first iteration uses the initial layout
    again. A ring all-reduce sums each element in an order set by its position in the bucket,
    so with more than 2 ranks a resume changes the rounding of one step (measured: weights
    1.9e-7 apart after 40 steps on 4 ranks). Summing in float64 makes the float32 result the
    same whatever the order. Twice the bytes on the wire; register it for bit-exact DDP resumes:
    ``model.register_comm_hook(None, exact_allreduce_hook)``. (FSDP2 keeps a fixed layout and
    needs nothing.)"""
    if bucket.index() == 0:
        note_collective()  # this rank's compute before the step's first collective
    grads = bucket.buffer()
    group = process_group if process_group is not None else dist.group.WORLD
    wide = grads.to(torch.float64)
    future = dist.all_reduce(wide, group=group, async_op=True).get_future()

    def average(fut):
        grads.copy_(fut.value()[0].div_(dist.get_world_size(group)))
        return grads

    return future.then(average)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ShardedRestored(Restored):
    """A restored gang checkpoint: this rank's own state, and where its DCP objects are
    (read on ``load_sharded``: only the ranges this rank's load plan needs)."""

    storage: Storage | None = None
    bytes_read: int = 0  # of the sharded state from storage, by ``load_sharded`` (metadata included)
    local_bytes: int = 0  # of it from this pod's copies instead (shard_cache.py)
    local: ShardCache | None = None

    def load_sharded(self, target: Any, *, process_group: Any = None,
                     read: ReadConfig | None = None) -> None:
        """Load the ``"sharded"`` state into ``target`` in place (DCP; reshards as needed)."""
        if self.storage is None:
            raise CheckpointError(f"checkpoint {self.info.uri} has no sharded state")
        reader = StorageReader(self.storage, self.info, read, local=self.local)
        try:
            dcp_load(target, reader, process_group)
        finally:
            self.bytes_read += reader.bytes_read
            self.local_bytes += reader.local_bytes


class GroupPeers:
    """A process group's answers to a session's collective questions (peers.py), on gloo
    groups of their own (never the model's, possibly NCCL, group) with a bounded timeout."""

    def __init__(self, timeout_seconds: float | None = None) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.leads = self.rank == 0
        self.leads_pod = int(os.environ.get("LOCAL_RANK", "0")) == 0
        timeout = timedelta(seconds=collective_timeout(timeout_seconds))
        # Training thread: agreement, DCP planning, restore. Upload thread: commit handshake.
        self.ctl_group = dist.new_group(backend="gloo", timeout=timeout)
        self.io_group = dist.new_group(backend="gloo", timeout=timeout)
        self._agreed: tuple[int, tuple[bool, ...]] | None = None

    def describe(self, context: str) -> str:
        return f"{context} rank {self.rank}/{self.world_size}"

    def agree(self, step: int, flags: Callable[[], Sequence[bool]]) -> tuple[bool, ...]:
        """One tiny all-reduce per step boundary (asked again at the same step: the answer
        already agreed), so every rank stops or saves at the same step."""
        if self._agreed is not None and self._agreed[0] == step:
            return self._agreed[1]
        mine = torch.tensor([int(f) for f in flags()], dtype=torch.int32)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.ctl_group)
        self._agreed = (step, tuple(bool(f) for f in mine))
        return self._agreed[1]

    def all(self, ok: bool) -> bool:
        flag = torch.tensor([int(ok)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.ctl_group)
        return bool(flag[0])

    def pick(self, choose: Callable[[], T]) -> T:
        picked: list[Any] = [choose() if self.rank == 0 else None]
        dist.broadcast_object_list(picked, src=0, group=self.ctl_group)
        return picked[0]

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.ctl_group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.ctl_group)


class ShardedSnapshots:
    """A rank's state -> a ``Snapshot``: its own entries as ``rank<r>-<name>``, the
    ``"sharded"`` entry staged into CPU buffers (``dcp_storage.Staging``) for the commit to
    write with DCP, straight to storage. The loop waits for the copies only."""

    def __init__(self, peers: GroupPeers) -> None:
        self.peers = peers
        self.local = LocalSnapshots()
        self.staging = Staging()

    def take(self, step: int, epoch: int, state: Mapping[str, Any], trainer_doc: dict[str, Any],
             extra: dict[str, Any], spool: str | None, defer: Any = None) -> Snapshot:
        # ``defer`` is not taken up: a gang's ranks commit together, each copy whole at once.
        state = dict(state)
        sharded = state.pop(SHARDED, None)
        snap = self.local.take(step, epoch, state, trainer_doc, extra, spool)
        prefix = rank_prefix(self.peers.rank)
        snap.tensors = {prefix + k: v for k, v in snap.tensors.items()}
        snap.documents = {prefix + k: v for k, v in snap.documents.items()}
        if sharded is not None:
            snap.sharded = self.staging.stage(sharded)
            snap.nbytes += snap.sharded.nbytes
            snap.seconds += snap.sharded.seconds
        return snap


# What a gang's failed commit is raised as on every rank, by the worst of its ranks' errors:
# a supersession is never retried, a storage error is (the final checkpoint's retries).
_ERROR_KINDS = {"superseded": SupersededError, "storage": StorageError, "other": CheckpointError}


def _error_kind(e: BaseException) -> str:
    if isinstance(e, SupersededError):
        return "superseded"
    return "storage" if isinstance(e, (StorageError, OSError)) else "other"


def _gang_error_kind(kinds: list[str]) -> str:
    return next((k for k in ("superseded", "other") if k in kinds), "storage")


class GangCommit:
    """``AsyncCheckpointer``'s commit for a gang (upload thread, every rank in the same order):
    write the sharded state with DCP straight to storage (``dcp_storage.StorageWriter``,
    collective: every rank or none), upload mine, exchange entries, rank 0 publishes the
    manifest listing everyone's files and tells the others how it went."""

    def __init__(self, peers: GroupPeers, local: ShardCache | None = None) -> None:
        self.rank, self.world_size, self.group = peers.rank, peers.world_size, peers.io_group
        self.local = local  # this pod's copy of my DCP object (shard_cache.py)

    def __call__(self, storage: Storage, step: int, files: dict[str, str], *, epoch: int,
                 phase: str, config_fingerprint: str, run_id: str = "", attempt: int | None = None,
                 extra: dict | None = None, digests: dict | None = None, retry: Any = None,
                 uid: str = "", sharded: Staged | None = None) -> CheckpointInfo:
        error, kind = None, None
        mine: dict[str, Any] = {}
        try:
            if sharded is not None:
                # First, and on every rank: dcp.save is collective and reports any rank's
                # failure to all of them, so no rank is left waiting in it.
                # a pod copy only of sharded state: replicated state comes back from peers
                local = None if self.local is None or is_replicated(sharded.state) else self.local
                writer = StorageWriter(storage, step, attempt=attempt, uid=uid, retry=retry,
                                       local=local)
                try:
                    dcp_save(sharded.state, writer, self.group)
                finally:
                    sharded.release()
                sharded.written = dict(writer.entries)
                mine.update(writer.entries)
            mine.update(upload_shards(storage, step, files, attempt=attempt, digests=digests,
                                      retry=retry, uid=uid))
        except BaseException as e:  # noqa: BLE001 - reported to rank 0, which will not publish
            mine, error, kind = {}, f"rank {self.rank}: {type(e).__name__}: {e}", _error_kind(e)
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, (mine, error, kind), group=self.group)
        outcome: list[Any] = [None]
        if self.rank == 0:
            errors = [e for _, e, _ in everyone if e]
            if errors:
                outcome[0] = (None, "; ".join(errors), _gang_error_kind(
                    [k for _, e, k in everyone if e]))
            else:
                merged: dict[str, Any] = {}
                for entries, _, _ in everyone:
                    merged.update(entries)
                try:
                    info = publish_manifest(storage, step, merged, epoch=epoch, phase=phase,
                                            config_fingerprint=config_fingerprint, run_id=run_id,
                                            attempt=attempt, extra=extra, retry=retry, uid=uid)
                    outcome[0] = (info.manifest.to_json(), None, None)
                except BaseException as e:  # noqa: BLE001 - every rank must hear about it
                    outcome[0] = (None, f"rank 0: {type(e).__name__}: {e}", _error_kind(e))
        dist.broadcast_object_list(outcome, src=0, group=self.group)
        manifest_json, why, kind = outcome[0]
        if why is not None:  # every rank raises the same kind: the retries stay in step
            raise _ERROR_KINDS[kind](f"checkpoint step {step} of the gang was not committed: {why}")
        manifest = Manifest.from_json(manifest_json)
        return CheckpointInfo(step, storage.uri_for(step_dir_name(step)), manifest, True, "ok")


class RankLoader:
    """A rank's part of a gang checkpoint: its own ``rank<r>-`` files (rank 0's for a rank
    that did not exist at save time), read in parallel and checked against the manifest, and
    the DCP objects vouched for (``vouch_files``), read later by ``load_sharded``. Nothing
    goes to local disk."""

    def __init__(self, rank: int, world_size: int = 1, local: ShardCache | None = None) -> None:
        self.rank, self.world_size, self.local = rank, world_size, local

    def load(self, storage: Storage, info: CheckpointInfo, prefetch: Any = None) -> Restored:
        assert info.manifest is not None
        files = info.manifest.files
        own = rank_prefix(self.rank) if any(n.startswith(rank_prefix(self.rank)) for n in files) else rank_prefix(0)
        mine = replace(info, manifest=replace(info.manifest, files={
            n: e for n, e in files.items() if n.startswith(own)}))
        state = {name[len(own):]: value for name, value in load_checkpoint(storage, mine).items()}
        restored = ShardedRestored("resume", info.step, info.manifest.epoch, info, state)
        if any(n.startswith(DCP_PREFIX) for n in files):
            restored.bytes_read = vouch_files(storage, info, self.rank, self.world_size)
            restored.storage, restored.local = storage, self.local
        return restored

    def close(self) -> None:
        pass


class DistributedSession(Session):
    """A ``Session`` shared by every rank of a process group; see the module docstring. It
    only supplies the group's parts: peers, snapshots, commit and loader."""

    def __init__(self, *, collective_timeout_seconds: float | None = None, **kwargs: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedSession needs torch.distributed initialised"
                               " (call phoenix_trainer.distributed.init_from_env() under torchrun)")
        member = GangMember.from_env()
        if member is not None and dist.get_world_size() != member.world_size:
            raise RuntimeError(
                f"this in-place gang ({member.members} pods x {member.local_world_size} ranks) needs"
                f" a process group of {member.world_size} ranks, but the default group has"
                f" {dist.get_world_size()}: call phoenix_trainer.distributed.init_from_env()"
                f" instead of dist.init_process_group() (torchrun runs standalone in each pod)")
        peers = GroupPeers(collective_timeout_seconds)
        parts: dict[str, Any] = {}
        local = None
        if member is not None:
            peer_dir = os.environ.get(ENV_PEER_DIR)
            parts["peer_state"] = PeerState(peers, peer_dir) if peer_dir else None
            parts["rejoin"] = Rejoin(member, None)  # the session gives it its storage
            local = ShardCache.from_env()  # sharded state: survivors re-read their own copies
        super().__init__(peers=peers, snapshots=ShardedSnapshots(peers),
                         commit=GangCommit(peers, local),
                         loader=RankLoader(peers.rank, peers.world_size, local), prefetch=None,
                         **parts, **kwargs)
        self.rank, self.world_size = peers.rank, peers.world_size
        self.ctl_group, self.io_group = peers.ctl_group, peers.io_group

