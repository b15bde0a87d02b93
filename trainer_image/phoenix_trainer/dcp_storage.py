"""torch.distributed.checkpoint (DCP) straight to Phoenix's storage: no local spool on save,
only the byte ranges a rank's load plan needs on restore.

- ``Staging`` takes the snapshot a gang's loop waits for: the sharded state (DTensors,
  plain tensors, scalars) copied into CPU buffers kept from one save to the next (DCP's own
  staging helpers; pinned where CUDA is there), so a save after the first allocates nothing.
- ``StorageWriter`` (a DCP ``StorageWriter``) runs on the checkpoint upload thread: each rank
  serializes its items into one object, ``dcp-__<rank>_0.distcp``, streamed through
  ``Storage.open_write`` (hashed as it streams; nothing on local disk) with the commit
  protocol's upload (``writer.upload_shards``: the fence checked before the first byte,
  retried by re-serializing the immutable snapshot, size and store checksum checked after).
  While streaming it also checksums each ``BLOCK_SIZE`` block (CRC-32), so a ranged read
  can be checked without reading the whole object. The coordinator then writes ``dcp-.metadata`` (DCP's
  own pickled metadata, readable by ``FileSystemReader`` once the prefix is dropped) and
  ``dcp-.blocks.json`` (the block checksums). The Phoenix manifest is still written last, by
  the gang's commit (distributed.py), listing every rank's files.
- ``StorageReader`` (a DCP ``StorageReader``) serves ``dcp.load``: the metadata and block
  checksums are read whole and checked against the manifest; then only the blocks that hold
  the items this rank's load plan asks for are read, with the parallel reader
  (``read_parallel``: ranged reads in flight together, bounded memory), each block checked
  against its checksum as it arrives, and the items decoded from memory.
- ``vouch_files`` is the restore's check, before any rank commits to a checkpoint, that the
  DCP objects are the ones uploaded: a HEAD each where the store recorded a checksum (S3),
  else each rank hashes its share of the files (every file by exactly one rank).

The format is DCP's ``FileSystemWriter`` format (each tensor a ``torch.save`` record at an
offset of its rank's file), so ``dcp_to_torch_save`` reads a downloaded copy. Never touches
local disk, never writes the manifest (the commit does), never logs credentials.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle
import threading
import time
import zlib
from pathlib import Path
from torch.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import (
    LoadPlan, LoadPlanner, SavePlan, SavePlanner, StorageReader as _DCPReader,
    StorageWriter as _DCPWriter,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from .checkpoint import ViewReader
from .core.errors import CheckpointError, CorruptCheckpointError, ObjectMismatchError, StorageError
from .core.layout import CheckpointInfo, sha256_stream, step_dir_name
from .core.storage import FileEntry, ReadConfig, Storage, read_parallel
from .core.storage.file import LocalStorage
from .shard_cache import ShardCache, Tee
from .core.writer import RetryPolicy, StreamedShard, upload_shards
from .tensors import tree_nbytes

log = logging.getLogger("phoenix.checkpoint")

DCP_PREFIX = "dcp-"  # a gang checkpoint's DCP objects: step-N/dcp-<DCP's file name>
METADATA = ".metadata"  # DCP's own name for it
BLOCKS = ".blocks.json"
BLOCK_SIZE = 4 << 20  # a ranged read over-reads at most one block at each end of a run
# An item this small (a scalar, an optimizer's step count, pickled param groups) gets its own
# checksum, so a rank that needs it alone from another rank's object reads just its bytes,
# not the block around it (DCP stores a replicated item once, on any rank).
SMALL_ITEM = 64 << 10
SUFFIX = ".distcp"


def dcp_key(step: int, name: str) -> str:
    return f"{step_dir_name(step)}/{DCP_PREFIX}{name}"


def _plain(e: CheckpointException, what: str) -> Exception:
    """DCP reports any rank's failure to every rank as one ``CheckpointException`` (a
    ``BaseException``); Phoenix's callers handle its kinds of error: a corrupt object stays
    ``CorruptCheckpointError`` (the restore falls back), a storage failure ``StorageError``."""
    failures = {rank: exc for rank, (exc, _) in e.failures.items()}
    told = "; ".join(f"rank {r}: {type(x).__name__}: {x}" for r, x in sorted(failures.items()))
    kinds = [type(x) for x in failures.values()]
    for kind in (CorruptCheckpointError, StorageError):
        if any(issubclass(k, kind) for k in kinds):
            return kind(f"{what}: {told}")
    return CheckpointError(f"{what}: {told}")


def save(state: Any, writer: "StorageWriter", process_group: Any = None, **kwargs: Any) -> None:
    """``dcp.save`` through ``writer``, collective over ``process_group``; any rank's failure
    raised on every rank as a plain error (``_plain``)."""
    try:
        dcp.save(state, storage_writer=writer, process_group=process_group, **kwargs)
    except CheckpointException as e:
        raise _plain(e, f"DCP save of checkpoint step {writer.step}") from e


def load(target: Any, reader: "StorageReader", process_group: Any = None, **kwargs: Any) -> None:
    """``dcp.load`` into ``target`` in place through ``reader``; errors as in ``save``."""
    try:
        dcp.load(target, storage_reader=reader, process_group=process_group, **kwargs)
    except CheckpointException as e:
        raise _plain(e, f"DCP load of checkpoint {reader.info.uri}") from e


def local_nbytes(obj: Any) -> int:
    """Bytes this rank holds of a (possibly sharded) state tree: a DTensor counts its local
    shard, not the global tensor it stands for."""
    from torch.distributed.tensor import DTensor

    return tree_nbytes(obj, lambda x: x.to_local() if isinstance(x, DTensor) else x)


# -- the snapshot ------------------------------------------------------------------------

@dataclass
class Staged:
    """A snapshot of the sharded state in CPU buffers; ``release`` hands the buffers back
    for the next save once the upload no longer reads them."""

    state: Any
    nbytes: int
    seconds: float
    release: Callable[[], None] = lambda: None
    written: dict[str, FileEntry] = dataclasses.field(default_factory=dict)  # by the commit


class Staging:
    """CPU copies of the sharded state, their buffers reused. A save still uploading holds
    its buffers, so up to ``keep`` sets are kept (one per save in flight, plus the one being
    taken); a state whose structure changed gets fresh buffers."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._free: list[Any] = []
        self._lock = threading.Lock()

    def stage(self, state: Any) -> Staged:
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        t0 = time.perf_counter()
        cuda = torch.cuda.is_available()
        with self._lock:
            buffers = self._free.pop() if self._free else None
        copied = None
        if buffers is not None:
            try:
                copied = _copy_state_dict(state, buffers, non_blocking=cuda, type_check=False)
            except Exception:  # noqa: BLE001 - the state's structure changed: new buffers
                buffers = None
        if buffers is None:
            buffers = _create_cpu_state_dict(state, pin_memory=cuda)
            copied = _copy_state_dict(state, buffers, non_blocking=cuda, type_check=False)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return Staged(copied, local_nbytes(copied), seconds, lambda: self._give_back(buffers))

    def _give_back(self, buffers: Any) -> None:
        with self._lock:
            if len(self._free) < self.keep and all(b is not buffers for b in self._free):
                self._free.append(buffers)


# -- writing -----------------------------------------------------------------------------

def block_checksum(data: Any, value: int = 0) -> int:
    """The per-block checksum: CRC-32, about 7x cheaper than sha256 here, since it is a
    second pass over every byte a save streams (the object's sha256 is the first). It
    catches a damaged or misplaced range; that the object is the one uploaded is the
    store's sha256 checksum's job (``vouch_files``)."""
    return zlib.crc32(data, value)


class BlockHashes:
    """A write-only stream that counts bytes and checksums every ``block_size`` block of
    them (``block_checksum``, as 8 hex digits), passing everything on to ``sink``."""

    def __init__(self, sink: Any, block_size: int = BLOCK_SIZE) -> None:
        self.sink, self.block_size = sink, block_size
        self.n = 0
        self.digests: list[str] = []
        self.failed: BaseException | None = None  # the sink's error, if a write failed
        self._c = 0
        self._item: int | None = None  # a small item's own checksum, while it is written

    def begin_item(self) -> None:
        """Checksum what is written from here on by itself too (a small item: ``end_item``)."""
        self._item = 0

    def end_item(self) -> str | None:
        value, self._item = self._item, None
        return None if value is None else "%08x" % value

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        try:
            self.sink.write(mv)
        except BaseException as e:
            self.failed = e
            raise
        if self._item is not None:
            self._item = block_checksum(mv, self._item)
        done = 0
        while done < len(mv):
            take = min(len(mv) - done, self.block_size - self.n % self.block_size)
            self._c = block_checksum(mv[done:done + take], self._c)
            done += take
            self.n += take
            if self.n % self.block_size == 0:
                self.digests.append("%08x" % self._c)
                self._c = 0
        return len(mv)

    def flush(self) -> None:
        pass

    def finish(self) -> list[str]:
        if self.n % self.block_size:
            self.digests.append("%08x" % self._c)
            self._c = 0
        return self.digests


@dataclass(frozen=True)
class _Written:
    """What a rank's ``write_data`` tells the coordinator about one item (never stored):
    where it is, and for the first item of a file that file's block digests."""

    info: _StorageInfo
    blocks: tuple[str, ...] | None = None
    item: str | None = None  # a small item's own checksum (read alone, without its blocks)


def _expected_size(item: Any) -> int:
    """A write item's tensor bytes (its ``torch.save`` record adds a header); 0 for bytes."""
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return 0
    n = 1
    for d in item.tensor_data.size:
        n *= d
    return n * torch._utils._element_size(item.tensor_data.properties.dtype)


def _cpu_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # torch.save of a view writes its whole storage
    return t


class StorageWriter(_DCPWriter):
    """DCP's writer into ``storage`` at ``step-N/``; see the module docstring. ``entries``:
    this rank's objects (the coordinator's include the metadata), for the manifest."""

    def __init__(self, storage: Storage, step: int, *, attempt: int | None = None, uid: str = "",
                 retry: RetryPolicy | None = None, block_size: int = BLOCK_SIZE,
                 local: ShardCache | None = None) -> None:
        super().__init__()
        self.storage, self.step, self.attempt, self.uid = storage, step, attempt, uid
        self.local = local  # keeps a copy of this rank's object in the pod (shard_cache.py)
        self.retry, self.block_size = retry or RetryPolicy(), block_size
        self.entries: dict[str, FileEntry] = {}
        self.is_coordinator = False

    def reset(self, checkpoint_id: Any = None) -> None:
        self.entries = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # only ever handed in as storage_writer=

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=_StoragePrefix(f"__{i}_"))
                for i, p in enumerate(plans)]

    def _upload(self, files: dict[str, StreamedShard]) -> None:
        self.entries.update(upload_shards(self.storage, self.step, files, attempt=self.attempt,
                                          retry=self.retry, uid=self.uid))

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0{SUFFIX}"
        results: list[WriteResult] = []
        size_hint = sum(_expected_size(item) for item in plan.items
                        if item.type != WriteItemType.BYTE_IO)

        tees: list[Tee] = []  # the local copy of the current try, if kept

        def produce(f: Any) -> None:
            # Called again on a retry: the staged state is immutable, so the bytes repeat.
            results.clear()
            if self.local is not None:
                for t in tees:
                    t.drop()
                tees[:] = [self.local.tee(f)]
                f = tees[0]
            out = BlockHashes(f, self.block_size)
            for item in plan.items:
                data = planner.resolve_data(item)
                start = out.n
                if _expected_size(item) <= SMALL_ITEM:
                    out.begin_item()
                if item.type == WriteItemType.BYTE_IO:
                    out.write(data.getbuffer())
                else:
                    try:
                        torch.save(_cpu_tensor(data), out)
                    except BaseException:
                        # torch.save's zip writer replaces a failed write's error with its
                        # own ("unexpected pos"): report the storage's, which a retry handles.
                        if out.failed is not None:
                            raise out.failed from None
                        raise
                crc, n = out.end_item(), out.n - start
                results.append(WriteResult(index=item.index, size_in_bytes=n, storage_data=_Written(
                    _StorageInfo(name, start, n), item=crc if n <= SMALL_ITEM else None)))
            blocks = tuple(out.finish())
            if results:
                first = results[0]
                results[0] = dataclasses.replace(
                    first, storage_data=dataclasses.replace(first.storage_data, blocks=blocks))

        if plan.items:
            try:
                self._upload({DCP_PREFIX + name: StreamedShard(produce, size_hint or None)})
            except BaseException:
                for t in tees:
                    t.drop()
                raise
            if tees and self.local is not None:
                entry = self.entries[DCP_PREFIX + name]
                self.local.keep(tees[-1], entry.sha256, entry.size)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(list(results))
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        located: dict[Any, _StorageInfo] = {}
        blocks: dict[str, list[str]] = {}
        items: dict[str, dict[str, str]] = {}  # object -> offset of a small item -> its checksum
        for wrs in results:
            for wr in wrs:
                where = wr.storage_data.info
                located[wr.index] = where
                if wr.storage_data.blocks is not None:
                    blocks[where.relative_path] = list(wr.storage_data.blocks)
                if wr.storage_data.item is not None:
                    items.setdefault(where.relative_path, {})[str(where.offset)] = wr.storage_data.item
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = located
        metadata.storage_meta = StorageMeta()
        meta = pickle.dumps(metadata)
        digests = json.dumps({"blockSize": self.block_size, "checksum": "crc32", "files": blocks,
                              "items": items}, sort_keys=True).encode()
        self._upload({DCP_PREFIX + METADATA: StreamedShard(lambda f: f.write(meta), len(meta)),
                      DCP_PREFIX + BLOCKS: StreamedShard(lambda f: f.write(digests), len(digests))})

    def storage_meta(self) -> StorageMeta | None:
        return None


# -- reading -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """Bytes ``[start, end)`` of one object to read together (block-aligned, ``end`` may be
    the object's end), holding the stored items ``items`` (offset, length, index)."""

    key: str
    start: int
    end: int
    items: tuple[tuple[int, int, Any], ...]

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_runs(key: str, items: Iterable[tuple[int, int, Any]], object_size: int,
              block_size: int, cap: int) -> list[Run]:
    """Cover the stored items ``(offset, length, index)`` of one object with block-aligned
    runs: items whose blocks touch share a run, up to ``cap`` bytes (an item bigger than
    that gets a run of its own). Pure: the reader's read plan, unit-tested."""
    runs: list[Run] = []
    start = end = -1
    held: list[tuple[int, int, Any]] = []
    for off, n, index in sorted(items, key=lambda t: (t[0], t[1])):
        if off < 0 or off + n > object_size:
            raise CorruptCheckpointError(f"{key}: an item at {off}+{n} lies outside its"
                                         f" {object_size} bytes")
        b0 = off // block_size * block_size
        b1 = min(-(-(off + n) // block_size) * block_size, object_size)
        if held and b0 <= end and max(end, b1) - start <= cap:
            end = max(end, b1)
        else:
            if held:
                runs.append(Run(key, start, end, tuple(held)))
            start, end, held = b0, b1, []
        held.append((off, n, index))
    if held:
        runs.append(Run(key, start, end, tuple(held)))
    return runs


class _Windows:
    """``read_parallel`` over windows of objects: the key ``"<key>@<start>"`` reads the bytes
    of ``key`` from ``start``; the total it reports is the window's, once the object's own
    size is checked against the manifest's. An object with a local copy (``local``: key ->
    file, shard_cache.py) is read from that file; ``bytes_read`` counts storage's bytes only,
    ``local_bytes`` the copies'."""

    def __init__(self, storage: Storage, sizes: dict[str, int], windows: dict[str, tuple[str, int, int]],
                 local: dict[str, Any] | None = None) -> None:
        self.storage, self.sizes, self.windows = storage, sizes, windows
        # key -> (a file storage over the copy's folder, the copy's name)
        self.local = {k: (LocalStorage(Path(p).parent), Path(p).name) for k, p in (local or {}).items()}
        self.bytes_read = self.local_bytes = 0
        self._lock = threading.Lock()

    def uri_for(self, wkey: str) -> str:
        return self.storage.uri_for(self.windows[wkey][0])

    def is_local(self, wkey: str) -> bool:
        return self.windows[wkey][0] in self.local

    def read_into(self, wkey: str, offset: int, view: Any) -> int:
        key, start, length = self.windows[wkey]
        if key in self.local:
            folder, name = self.local[key]
            try:
                if folder.read_into(name, start + offset, view) == self.sizes[key]:
                    with self._lock:
                        self.local_bytes += len(memoryview(view))
                    return length
            except OSError:  # the copy went away: storage has the object
                pass
        return self.read_remote(wkey, offset, view)

    def read_remote(self, wkey: str, offset: int, view: Any) -> int:
        key, start, length = self.windows[wkey]
        total = self.storage.read_into(key, start + offset, view)
        if total != self.sizes[key]:
            raise ObjectMismatchError(self.storage.uri_for(key), total, self.sizes[key])
        with self._lock:
            self.bytes_read += len(memoryview(view))
        return length


class StorageReader(_DCPReader):
    """DCP's reader of a gang checkpoint ``info`` in ``storage``; see the module docstring.
    ``bytes_read``: what this rank read, metadata included."""

    def __init__(self, storage: Storage, info: CheckpointInfo, read: ReadConfig | None = None,
                 local: ShardCache | None = None) -> None:
        super().__init__()
        if info.manifest is None:
            raise CorruptCheckpointError(f"checkpoint {info.uri} has no readable manifest")
        self.storage, self.info, self.read = storage, info, read or ReadConfig.from_env()
        self.local = local  # this pod's copies of the objects (shard_cache.py)
        self.local_bytes = 0  # read from them instead of storage
        self.files = info.manifest.files
        self.storage_data: dict[Any, _StorageInfo] = {}
        self.blocks: dict[str, list[str]] = {}
        self.items: dict[str, dict[int, str]] = {}  # small items' own checksums, by offset
        self.block_size = BLOCK_SIZE
        self.bytes_read = 0

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def _whole(self, name: str) -> bytes:
        full = DCP_PREFIX + name
        entry = self.files.get(full)
        if entry is None:
            raise CorruptCheckpointError(f"checkpoint {self.info.uri} lists no {full}")
        try:
            data, sha = self.storage.get_bytes_sha256(dcp_key(self.info.step, name))
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"checkpoint {self.info.uri}: {full} is missing") from e
        if (len(data), sha) != (entry.size, entry.sha256):
            raise CorruptCheckpointError(f"checkpoint {self.info.uri}: {full} does not match its"
                                         " manifest entry (size or sha256)")
        self.bytes_read += len(data)
        return data

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            metadata = pickle.loads(self._whole(METADATA))
            digests = json.loads(self._whole(BLOCKS))
            if digests.get("checksum") != "crc32":
                raise CorruptCheckpointError(f"block checksum {digests.get('checksum')!r} is not crc32")
            self.block_size = int(digests["blockSize"])
            self.blocks = {str(k): list(v) for k, v in digests["files"].items()}
            self.items = {str(k): {int(o): str(c) for o, c in v.items()}
                          for k, v in (digests.get("items") or {}).items()}
        except CorruptCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - unreadable metadata: an unusable checkpoint
            raise CorruptCheckpointError(f"checkpoint {self.info.uri}: DCP metadata cannot be"
                                         f" decoded ({e})") from e
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        if metadata.storage_data is None:
            raise CorruptCheckpointError(f"checkpoint {self.info.uri}: DCP metadata has no storage data")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        t0 = time.perf_counter()
        wanted: dict[Any, list[Any]] = {}  # a stored item -> the requests it serves
        for req in plan.items:
            wanted.setdefault(req.storage_index, []).append(req)
        per_object: dict[str, list[tuple[int, int, Any]]] = {}
        for index in wanted:
            where = self.storage_data[index]
            if where.transform_descriptors:
                raise CheckpointError(f"checkpoint {self.info.uri}: stream transforms"
                                      f" {where.transform_descriptors} are not supported")
            per_object.setdefault(where.relative_path, []).append((where.offset, where.length, index))
        cap = max(self.block_size, self.read.memory_bytes // 4)
        runs: list[Run] = []
        sizes: dict[str, int] = {}
        copies: dict[str, Any] = {}  # key -> this pod's copy of the object
        exact: dict[int, str] = {}  # a run that is one small item -> that item's checksum
        for name, items in sorted(per_object.items()):
            entry = self.files.get(DCP_PREFIX + name)
            if entry is None or name not in self.blocks:
                raise CorruptCheckpointError(f"checkpoint {self.info.uri} lists no {DCP_PREFIX}{name}"
                                             " (or no block checksums for it)")
            key = dcp_key(self.info.step, name)
            sizes[key] = entry.size
            copy = self.local.find(entry.sha256, entry.size) if self.local is not None else None
            if copy is not None:
                copies[key] = copy
            else:  # small items with their own checksum: just their bytes, not their blocks
                own = self.items.get(name, {})
                alone = [it for it in items if it[1] <= SMALL_ITEM and it[0] in own]
                for off, n, index in alone:
                    if off < 0 or off + n > entry.size:
                        raise CorruptCheckpointError(f"{name}: an item at {off}+{n} lies outside"
                                                     f" its {entry.size} bytes")
                    exact[len(runs)] = own[off]
                    runs.append(Run(name, off, off + n, ((off, n, index),)))
                items = [it for it in items if it not in alone]
            if items:
                runs += plan_runs(name, items, entry.size, self.block_size, cap)
        # One window per block of each run (a block two runs share is read by each).
        windows: dict[str, tuple[str, int, int]] = {}
        home: dict[str, tuple[int, str]] = {}  # window -> (its run, the object's name)
        order: list[tuple[str, int]] = []
        left = [0] * len(runs)  # windows of each run not yet in
        for i, run in enumerate(runs):
            key = dcp_key(self.info.step, run.key)
            step = max(run.size, 1) if i in exact else self.block_size
            for s in range(run.start, run.end, step):
                wkey = f"{key}@{s}#{i}"
                windows[wkey] = (key, s, min(step, run.end - s))
                home[wkey] = (i, run.key)
                order.append((wkey, windows[wkey][2]))
                left[i] += 1
        buffers: dict[int, bytearray] = {}

        def alloc(wkey: str, size: int) -> Any:
            i, _ = home[wkey]
            buf = buffers.get(i)
            if buf is None:
                buf = buffers[i] = bytearray(runs[i].size)
            start = windows[wkey][1] - runs[i].start
            return memoryview(buf)[start:start + size]

        io_ = _Windows(self.storage, sizes, windows, copies)
        try:
            # each block is checked against its CRC-32 below: a sha256 of a window checks nothing
            for f in read_parallel(io_, order, alloc, self.read, digest=False):
                _, s, n = windows[f.key]
                i, name = home[f.key]
                digests = self.blocks[name]
                b = s // self.block_size
                want = exact[i] if i in exact else digests[b] if b < len(digests) else None
                bad = want is None or "%08x" % block_checksum(f.buffer) != want
                if bad and io_.is_local(f.key):  # the copy is damaged: storage's bytes decide
                    log.warning("this pod's copy of %s%s fails its checksum at bytes %d-%d;"
                                " reading them from storage", DCP_PREFIX, name, s, s + n)
                    io_.read_remote(f.key, 0, f.buffer)
                    bad = "%08x" % block_checksum(f.buffer) != want
                if bad:
                    raise CorruptCheckpointError(
                        f"checkpoint {self.info.uri}: {DCP_PREFIX}{name} bytes {s}-{s + n} do not"
                        " match their checksum (the stored object is corrupt)")
                left[i] -= 1
                if left[i] == 0:
                    self._decode(runs[i], buffers.pop(i), wanted, planner)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"checkpoint {self.info.uri}: a DCP object is missing ({e})") from e
        except ObjectMismatchError as e:
            raise CorruptCheckpointError(f"checkpoint {self.info.uri}: {e}") from e
        self.bytes_read += io_.bytes_read
        self.local_bytes += io_.local_bytes
        log.info("read %.1f MB of checkpoint %s's sharded state (%d ranges of %d objects) in %.2fs"
                 "%s", io_.bytes_read / 1e6, self.info.uri, len(order), len(per_object),
                 time.perf_counter() - t0,
                 f", and {io_.local_bytes / 1e6:.1f} MB from this pod's copies of"
                 f" {len(copies)} of them" if copies else "")
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _decode(self, run: Run, buf: bytearray, wanted: dict[Any, list[Any]], planner: LoadPlanner) -> None:
        view = memoryview(buf)
        for off, n, index in run.items:
            part = view[off - run.start:off - run.start + n]
            reqs = wanted[index]
            if reqs[0].type == LoadItemType.BYTE_IO:
                for req in reqs:
                    planner.load_bytes(req, io.BytesIO(bytes(part)))
                continue
            try:
                stored = torch.load(ViewReader(part), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - digests matched, so it was written so
                raise CorruptCheckpointError(f"checkpoint {self.info.uri}: item {index} cannot"
                                             f" be decoded ({e})") from e
            for req in reqs:
                src = narrow_tensor_by_index(stored, req.storage_offsets, req.lengths)
                target = planner.resolve_tensor(req).detach()
                if target.size() != src.size():
                    raise CorruptCheckpointError(f"checkpoint {self.info.uri}: item {index} has"
                                                 f" shape {tuple(src.size())}, the load plan wants"
                                                 f" {tuple(target.size())}")
                target.copy_(src)
                planner.commit_tensor(req, target)


# -- the restore's check -----------------------------------------------------------------

def vouch_files(storage: Storage, info: CheckpointInfo, rank: int, world_size: int) -> int:
    """Check that ``info``'s DCP objects are the ones its manifest lists, before the ranks
    agree to resume from it: size and the checksum the store recorded at upload, one HEAD
    each; an object the store keeps no checksum for is hashed whole, by one rank
    (``rank`` of ``world_size`` takes every ``world_size``-th). Raises
    ``CorruptCheckpointError``; returns the bytes read."""
    assert info.manifest is not None
    d = step_dir_name(info.step)
    unvouched: list[str] = []
    for name, entry in sorted(info.manifest.files.items()):
        if not name.startswith(DCP_PREFIX):
            continue
        size, stored = storage.stat(f"{d}/{name}")
        if size is None:
            raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {name} is missing")
        if size != entry.size:
            raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {name} has {size} bytes,"
                                         f" manifest says {entry.size}")
        if stored and entry.stored_checksum:
            if stored != entry.stored_checksum:
                raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {name} is not the"
                                             " object that was uploaded (stored checksum differs)")
        else:
            unvouched.append(name)
    read = 0
    for name in unvouched[rank::max(1, world_size)]:
        try:
            with storage.open_read(f"{d}/{name}") as reader:
                n, digest = sha256_stream(reader)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {name} is missing") from e
        read += n
        if digest != info.manifest.files[name].sha256:
            raise CorruptCheckpointError(f"checkpoint {info.uri}: shard {name} sha256 mismatch")
    return read


def dcp_names(names: Sequence[str]) -> list[str]:
    return [n for n in names if n.startswith(DCP_PREFIX)]
