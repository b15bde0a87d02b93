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
  is written with ``torch.distributed.checkpoint``: each rank writes its own shard file to a
  local spool (the blocking part), then uploads it in the background. DCP writes files, so
  this is the one part of a checkpoint that still touches local disk: ``check_spool_room``
  refuses it on every rank together, before writing, when it would not fit
  (``PHOENIX_SPOOL_LIMIT_MB`` or the free space). The per-rank state streams to storage.
  Everything else in the state is per rank, as ``step-N/rank<r>-<name>`` (RNG states, data
  position, trainer.json); DCP's files are ``step-N/dcp-<name>`` (checkpoint file names are
  flat). The upload threads then exchange their files' sizes and sha256;
  rank 0 writes the one manifest listing every rank's files, last, after the fence check,
  and tells the others. A checkpoint missing any rank's file has no manifest (or fails
  verification) and is never resumed from, exactly like a partial single-process one.
- **Restore.** Rank 0 picks the candidate (newest valid, or ``PHOENIX_RESUME_FROM``) and
  broadcasts it; every rank downloads and verifies its own files and the DCP files; if any
  rank fails, all fall back to the previous checkpoint together. ``Restored.load_sharded``
  then loads with DCP, which reshards: a checkpoint written by 4 ranks loads on 2.
  Per-rank state of a rank that did not exist at save time comes from rank 0 (RNG streams
  then differ: exact in samples seen, not bitwise — see docs/trainer.md).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .checkpoint import Snapshot, check_spool_room
from .checkpointing import LocalSnapshots
from .core.errors import CheckpointError, CorruptCheckpointError, SpoolFullError
from .core.layout import CheckpointInfo, Manifest, step_dir_name
from .core.storage import Storage
from .core.writer import file_digest, publish_manifest, upload_shards
from .progress import note_collective
from .restore import Restored
from .session import Session
from .tensors import tree_nbytes

T = TypeVar("T")

ENV_COLLECTIVE_TIMEOUT = "PHOENIX_COLLECTIVE_TIMEOUT_SECONDS"
DEFAULT_COLLECTIVE_TIMEOUT = 60.0
SHARDED = "sharded"  # the state entry written with torch.distributed.checkpoint
DCP_PREFIX = "dcp-"


def rank_prefix(rank: int) -> str:
    return f"rank{rank}-"


def init_from_env(backend: str | None = None, timeout_seconds: float | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1)
    if nobody did; returns whether this process is part of a group of more than one."""
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout(timeout_seconds)))
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


def local_nbytes(obj: Any) -> int:
    """Bytes this rank holds of a (possibly sharded) state tree: a DTensor counts its local
    shard, not the global tensor it stands for."""
    from torch.distributed.tensor import DTensor

    return tree_nbytes(obj, lambda x: x.to_local() if isinstance(x, DTensor) else x)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ShardedRestored(Restored):
    """A restored gang checkpoint: this rank's own state, plus the DCP files on local disk."""

    sharded_dir: str | None = None

    def load_sharded(self, target: Any, *, process_group: Any = None) -> None:
        """Load the ``"sharded"`` state into ``target`` in place (DCP; reshards as needed)."""
        if self.sharded_dir is None:
            raise CheckpointError(f"checkpoint {self.info.uri} has no sharded state")
        dcp.load(target, storage_reader=dcp.FileSystemReader(self.sharded_dir),
                 process_group=process_group)


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
    ``"sharded"`` entry written with DCP into the spool (every rank or none)."""

    def __init__(self, peers: GroupPeers) -> None:
        self.peers = peers
        self.local = LocalSnapshots()

    def take(self, step: int, epoch: int, state: Mapping[str, Any], trainer_doc: dict[str, Any],
             extra: dict[str, Any], spool: str | None) -> Snapshot:
        state = dict(state)
        sharded = state.pop(SHARDED, None)
        snap = self.local.take(step, epoch, state, trainer_doc, extra, spool)
        prefix = rank_prefix(self.peers.rank)
        snap.tensors = {prefix + k: v for k, v in snap.tensors.items()}
        snap.documents = {prefix + k: v for k, v in snap.documents.items()}
        if sharded is not None:
            spool = spool or tempfile.mkdtemp(prefix="phoenix-dcp-")
            d = os.path.join(spool, step_dir_name(step), "dcp")
            shutil.rmtree(d, ignore_errors=True)
            self._check_spool(spool, step, sharded)
            t0 = time.perf_counter()
            dcp.save(sharded, storage_writer=dcp.FileSystemWriter(d), process_group=self.peers.ctl_group)
            for name in sorted(os.listdir(d)):
                path = os.path.join(d, name)
                snap.files[DCP_PREFIX + name] = path
                snap.nbytes += os.path.getsize(path)
            snap.seconds += time.perf_counter() - t0
        return snap

    def _check_spool(self, spool: str, step: int, sharded: Any) -> None:
        """Every rank or none writes its DCP files (dcp.save is collective): one rank short of
        spool fails the checkpoint on all of them, with its reason."""
        problem = None
        try:
            check_spool_room(spool, local_nbytes(sharded),
                             f"checkpoint step {step} (rank {self.peers.rank}'s sharded state)")
        except SpoolFullError as e:
            problem = str(e)
        reasons = self.peers.gather(problem)
        if any(reasons):
            raise SpoolFullError("; ".join(r for r in reasons if r))


class GangCommit:
    """``AsyncCheckpointer``'s commit for a gang (upload thread, every rank in the same order):
    upload mine, exchange entries, rank 0 publishes the manifest listing everyone's files and
    tells the others how it went."""

    def __init__(self, peers: GroupPeers) -> None:
        self.rank, self.world_size, self.group = peers.rank, peers.world_size, peers.io_group

    def __call__(self, storage: Storage, step: int, files: dict[str, str], *, epoch: int,
                 phase: str, config_fingerprint: str, run_id: str = "", attempt: int | None = None,
                 extra: dict | None = None, digests: dict | None = None, retry: Any = None,
                 uid: str = "") -> CheckpointInfo:
        error = None
        try:
            mine = upload_shards(storage, step, files, attempt=attempt, digests=digests, retry=retry,
                                 uid=uid)
        except BaseException as e:  # noqa: BLE001 - reported to rank 0, which will not publish
            mine, error = {}, f"rank {self.rank}: {type(e).__name__}: {e}"
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, (mine, error), group=self.group)
        outcome: list[Any] = [None]
        if self.rank == 0:
            errors = [e for _, e in everyone if e]
            if errors:
                outcome[0] = (None, "; ".join(errors))
            else:
                merged: dict[str, Any] = {}
                for entries, _ in everyone:
                    merged.update(entries)
                try:
                    info = publish_manifest(storage, step, merged, epoch=epoch, phase=phase,
                                            config_fingerprint=config_fingerprint, run_id=run_id,
                                            attempt=attempt, extra=extra, retry=retry, uid=uid)
                    outcome[0] = (info.manifest.to_json(), None)
                except BaseException as e:  # noqa: BLE001 - every rank must hear about it
                    outcome[0] = (None, f"rank 0: {type(e).__name__}: {e}")
        dist.broadcast_object_list(outcome, src=0, group=self.group)
        manifest_json, why = outcome[0]
        if why is not None:
            raise CheckpointError(f"checkpoint step {step} of the gang was not committed: {why}")
        manifest = Manifest.from_json(manifest_json)
        return CheckpointInfo(step, storage.uri_for(step_dir_name(step)), manifest, True, "ok")


class RankLoader:
    """A rank's part of a gang checkpoint: its own ``rank<r>-`` files (rank 0's for a rank
    that did not exist at save time) and the DCP files, downloaded to a local folder and
    checked against the manifest."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.folder: str | None = None

    def load(self, storage: Storage, info: CheckpointInfo, prefetch: Any = None) -> Restored:
        assert info.manifest is not None
        files = info.manifest.files
        own = rank_prefix(self.rank) if any(n.startswith(rank_prefix(self.rank)) for n in files) else rank_prefix(0)
        self.close()
        self.folder = tempfile.mkdtemp(prefix="phoenix-restore-")
        state: dict[str, Any] = {}
        os.makedirs(os.path.join(self.folder, "dcp"))
        for name in sorted(n for n in files if n.startswith((own, DCP_PREFIX))):
            local = ("dcp/" + name[len(DCP_PREFIX):]) if name.startswith(DCP_PREFIX) else name
            path = os.path.join(self.folder, local)
            try:
                storage.get_file(f"{step_dir_name(info.step)}/{name}", path)
            except FileNotFoundError as e:
                raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {name} is missing") from e
            got = file_digest(path)
            if (got.size, got.sha256) != (files[name].size, files[name].sha256):
                raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {name} does not match"
                                             " its manifest entry (size or sha256)")
            if name.startswith(own):
                key = name[len(own):]
                state[key] = _decode(path, key, info)
        restored = ShardedRestored("resume", info.step, info.manifest.epoch, info, state)
        if any(n.startswith(DCP_PREFIX) for n in files):
            restored.sharded_dir = os.path.join(self.folder, "dcp")
        return restored

    def close(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


class DistributedSession(Session):
    """A ``Session`` shared by every rank of a process group; see the module docstring. It
    only supplies the group's parts: peers, snapshots, commit and loader."""

    def __init__(self, *, collective_timeout_seconds: float | None = None, **kwargs: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedSession needs torch.distributed initialised"
                               " (call phoenix_trainer.distributed.init_from_env() under torchrun)")
        peers = GroupPeers(collective_timeout_seconds)
        super().__init__(peers=peers, snapshots=ShardedSnapshots(peers), commit=GangCommit(peers),
                         loader=RankLoader(peers.rank), prefetch=None, **kwargs)
        self.rank, self.world_size = peers.rank, peers.world_size
        self.ctl_group, self.io_group = peers.ctl_group, peers.io_group


def _decode(path: str, name: str, info: CheckpointInfo) -> Any:
    try:
        if name.endswith(".json"):
            with open(path, "rb") as f:
                return json.load(f)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure means an unusable shard
        raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {name} cannot be decoded ({e})") from e
