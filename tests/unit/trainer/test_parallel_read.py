"""The parallel ranged reader (core/storage/parallel.py) and the restore built on it, against
LocalStorage: bytes land in order whatever order ranges finish in, the hash is the whole
object's, memory and concurrency stay within their bounds, and a damaged, short, long or
missing shard is refused - never loaded."""
from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest
import torch

from phoenix_trainer.checkpoint import AsyncCheckpointer, ShardBuffer, Snapshot, load_checkpoint
from phoenix_trainer.core.errors import CorruptCheckpointError, ObjectMismatchError, StorageError
from phoenix_trainer.core.layout import step_dir_name
from phoenix_trainer.core.storage import FileEntry, LocalStorage, ReadConfig, read_parallel
from phoenix_trainer.core.storage.entry import composite_sha256
from phoenix_trainer.core.storage.parallel import InOrderDigest

pytestmark = pytest.mark.unit
KiB = 1024


class Shuffled(LocalStorage):
    """Ranges finish in a shuffled order (each waits a random while), and it records how many
    reads are in flight at once, and which."""

    def __init__(self, root, seed=0, fail: dict | None = None):
        super().__init__(root)
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.in_flight = self.peak = 0
        self.reads: list[tuple[str, int, int]] = []
        self.fail = dict(fail or {})  # (key, offset) -> failures left

    def read_into(self, key, offset, view):
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.reads.append((key, offset, len(view)))
            delay = self.rng.random() * 0.01
            fail = self.fail.get((key, offset), 0)
            if fail:
                self.fail[(key, offset)] = fail - 1
        try:
            time.sleep(delay)
            if fail:
                raise StorageError(f"connection reset reading {key}")
            return super().read_into(key, offset, view)
        finally:
            with self.lock:
                self.in_flight -= 1


def put(st, key, data):
    st.put_bytes(key, data)
    return key, len(data)


def test_in_order_digest_hashes_whole_object_whatever_the_order():
    data = os.urandom(100 * KiB + 7)
    ranges = [(o, min(4 * KiB, len(data) - o)) for o in range(0, len(data), 4 * KiB)]
    for seed in range(5):
        random.Random(seed).shuffle(ranges)
        d = InOrderDigest(memoryview(data))
        for o, n in ranges:
            d.done(o, n)
            assert d.hashed <= len(data)
        assert d.hexdigest() == hashlib.sha256(data).hexdigest()
    d = InOrderDigest(memoryview(data))
    d.done(4 * KiB, 4 * KiB)  # the first range is still missing: nothing may be hashed
    assert d.hashed == 0
    with pytest.raises(RuntimeError):
        d.hexdigest()


def test_objects_come_back_whole_in_order_with_their_sha256(tmp_path):
    st = Shuffled(tmp_path)
    objs = [put(st, f"s/{i}", os.urandom(n)) for i, n in enumerate([0, 1, 37 * KiB, 64 * KiB, 5])]
    cfg = ReadConfig(part_size=4 * KiB, concurrency=4, memory_bytes=1 << 30)
    got = list(read_parallel(st, objs, lambda k, n: bytearray(n), cfg))
    assert [f.key for f in got] == [k for k, _ in objs]
    for f, (k, _) in zip(got, objs):
        data = (tmp_path / k).read_bytes()
        assert bytes(f.buffer) == data and f.sha256 == hashlib.sha256(data).hexdigest()
    # Every range of 4 KiB was one read; at most `concurrency` at a time, and it did overlap.
    assert sorted(r for r in st.reads if r[0] == "s/3") == [("s/3", o, 4 * KiB) for o in range(0, 64 * KiB, 4 * KiB)]
    assert 1 < st.peak <= 4


def test_digest_false_reads_the_same_bytes_and_hashes_nothing(tmp_path, monkeypatch):
    """A caller that checks its own way (the DCP reader: a CRC-32 per block) does not pay for a
    sha256 of every byte it reads."""
    st = Shuffled(tmp_path)
    objs = [put(st, f"w/{i}", os.urandom(n)) for i, n in enumerate([0, 9 * KiB, 33 * KiB])]
    made = []
    monkeypatch.setattr(InOrderDigest, "__init__", lambda self, view: made.append(view))
    cfg = ReadConfig(part_size=4 * KiB, concurrency=3, memory_bytes=1 << 30)
    got = list(read_parallel(st, objs, lambda k, n: bytearray(n), cfg, digest=False))
    assert [bytes(f.buffer) for f in got] == [(tmp_path / k).read_bytes() for k, _ in objs]
    assert [(f.sha256, f.composite) for f in got] == [(None, None)] * 3 and made == []


def test_an_object_read_with_its_upload_part_size_gives_the_stores_composite(tmp_path):
    # Read ranges (3 KiB) do not line up with the upload's parts (10 KiB): ranges are cut at
    # part boundaries, every part is hashed on its own, in any order, by the reading threads.
    st = Shuffled(tmp_path, seed=3)
    data = os.urandom(45 * KiB)
    key, n = put(st, "s/0", data)
    cfg = ReadConfig(part_size=3 * KiB, concurrency=4)
    (f,) = read_parallel(st, [(key, n, 10 * KiB)], lambda k, m: bytearray(m), cfg)
    parts = [hashlib.sha256(data[p:p + 10 * KiB]).digest() for p in range(0, n, 10 * KiB)]
    assert bytes(f.buffer) == data and f.sha256 is None
    assert f.composite == f.digest == composite_sha256(parts) and f.composite.endswith("-5")
    assert all(o // (10 * KiB) == (o + m - 1) // (10 * KiB) for _, o, m in st.reads)  # no range crosses a part
    assert sorted(o for _, o, _ in st.reads)[:5] == [0, 3 * KiB, 6 * KiB, 9 * KiB, 10 * KiB]
    # One byte changed: another composite. None for the part size: the whole sha256, as ever.
    damaged = bytearray(data)
    damaged[23 * KiB] ^= 1
    put(st, "s/0", bytes(damaged))
    (g,) = read_parallel(st, [(key, n, 10 * KiB)], lambda k, m: bytearray(m), cfg)
    assert g.composite != f.composite
    (h,) = read_parallel(st, [(key, n, None)], lambda k, m: bytearray(m), cfg)
    assert h.composite is None and h.digest == hashlib.sha256(damaged).hexdigest()


def test_restore_check_uses_the_composite_only_where_the_part_size_fits_it():
    sha, comp = "a" * 64, "Zm9v-3"
    assert FileEntry(25, sha, comp, part_size=10).restore_check() == (10, comp)
    # An older manifest (no part size), a single PUT (plain checksum), a part size that does
    # not give the composite's part count, no stored checksum: the whole sha256.
    for e in (FileEntry(25, sha, comp), FileEntry(25, sha, "Zm9v", part_size=10),
              FileEntry(25, sha, comp, part_size=5), FileEntry(25, sha, None, part_size=10),
              FileEntry(0, sha, comp, part_size=10)):
        assert e.restore_check() == (None, sha)


def test_memory_bound_admits_objects_only_while_they_fit(tmp_path):
    st = LocalStorage(tmp_path)
    objs = [put(st, f"s/{i}", os.urandom(10 * KiB)) for i in range(5)]
    held, peak, lock = [0], [0], threading.Lock()

    def alloc(key, size):
        with lock:
            held[0] += size
            peak[0] = max(peak[0], held[0])
        return bytearray(size)

    cfg = ReadConfig(part_size=KiB, concurrency=3, memory_bytes=25 * KiB)
    for f in read_parallel(st, objs, alloc, cfg):
        with lock:
            held[0] -= len(f.buffer)  # the consumer is done with it when it asks for the next
    assert peak[0] == 20 * KiB  # two of 10 KiB fit in 25 KiB, a third never
    # One object bigger than the bound is still read (alone).
    big = put(st, "big", os.urandom(40 * KiB))
    (f,) = read_parallel(st, [big], lambda k, n: bytearray(n), cfg)
    assert bytes(f.buffer) == (tmp_path / "big").read_bytes()


def test_a_failed_range_is_retried_then_gives_up(tmp_path):
    st = Shuffled(tmp_path, fail={("s/0", 4 * KiB): 2})
    obj = put(st, "s/0", os.urandom(16 * KiB))
    cfg = ReadConfig(part_size=4 * KiB, concurrency=2, attempts=3)
    (f,) = read_parallel(st, [obj], lambda k, n: bytearray(n), cfg)
    assert f.sha256 == hashlib.sha256((tmp_path / "s/0").read_bytes()).hexdigest()
    st.fail = {("s/0", 4 * KiB): 3}
    with pytest.raises(StorageError):
        list(read_parallel(st, [obj], lambda k, n: bytearray(n), cfg))


def test_short_long_and_missing_objects_are_refused(tmp_path):
    st = LocalStorage(tmp_path)
    key, n = put(st, "s/0", os.urandom(16 * KiB))
    cfg = ReadConfig(part_size=4 * KiB, concurrency=2)
    for expected in (n + 1, n + 10 * KiB, n - 1, 4 * KiB):  # short by a byte or a range; long
        with pytest.raises(ObjectMismatchError) as e:
            list(read_parallel(st, [(key, expected)], lambda k, m: bytearray(m), cfg))
        assert e.value.size == n and e.value.expected == expected
    with pytest.raises(FileNotFoundError):
        list(read_parallel(st, [("s/nope", 10)], lambda k, m: bytearray(m), cfg))
    with pytest.raises(ValueError):
        ReadConfig(concurrency=0)


def test_read_config_from_env():
    cfg = ReadConfig.from_env({"PHOENIX_RESTORE_PART_MB": "16", "PHOENIX_RESTORE_CONCURRENCY": "4",
                               "PHOENIX_RESTORE_MEMORY_MB": "512"})
    assert (cfg.part_size, cfg.concurrency, cfg.memory_bytes) == (16 << 20, 4, 512 << 20)
    assert ReadConfig.from_env({}) == ReadConfig()
    with pytest.raises(ValueError, match="PHOENIX_RESTORE_CONCURRENCY"):
        ReadConfig.from_env({"PHOENIX_RESTORE_CONCURRENCY": "many"})


# -- the restore -----------------------------------------------------------------------------

def saved(tmp_path, n_shards=3):
    st = Shuffled(tmp_path / "ckpt")
    ck = AsyncCheckpointer(st, phase="train", config_fingerprint="fp", spool_dir=str(tmp_path / "spool"))
    tensors = {f"s{i}.pt": {"w": torch.randn(300, 300 + i)} for i in range(n_shards)}  # ~360 KB
    tensors["big.pt"] = {"w": torch.randn(700, 700)}  # ~2 MB: a memory-file buffer
    ck.save(Snapshot.take(4, 0, tensors, {"trainer.json": {"step": 4}}), blocking=True)
    ck.close()
    return st, ck.latest, tensors


def test_restore_reads_ranges_and_loads_bit_exact(tmp_path):
    st, info, tensors = saved(tmp_path)
    out = load_checkpoint(st, info, read=ReadConfig(part_size=64 * KiB, concurrency=4))
    assert out["trainer.json"] == {"step": 4}
    for name, obj in tensors.items():
        assert torch.equal(out[name]["w"], obj["w"])
    assert st.peak > 1 and max(n for _, _, n in st.reads) <= 64 * KiB
    out["big.pt"]["w"].add_(1)  # the loaded tensors are writable (copy on write)
    assert torch.equal(out["big.pt"]["w"], tensors["big.pt"]["w"] + 1)


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "delete"])
def test_restore_refuses_a_damaged_shard(tmp_path, damage):
    st, info, _ = saved(tmp_path)
    path = tmp_path / "ckpt" / step_dir_name(4) / "big.pt"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1  # in a middle range: the hash must cover every range
        path.write_bytes(data)
    elif damage == "truncate":
        path.write_bytes(data[:-100])
    elif damage == "append":
        path.write_bytes(data + b"x")
    else:
        path.unlink()
    want = {"flip": "big.pt sha256 mismatch", "truncate": "big.pt has", "append": "big.pt has",
            "delete": "big.pt is missing"}[damage]
    with pytest.raises(CorruptCheckpointError, match=want):
        load_checkpoint(st, info, read=ReadConfig(part_size=64 * KiB, concurrency=4))


def test_shard_buffer_without_memfd_loads_the_same(tmp_path):
    st, info, tensors = saved(tmp_path)
    data = (tmp_path / "ckpt" / step_dir_name(4) / "big.pt").read_bytes()
    for mapped in (True, False):
        buf = ShardBuffer(len(data), mapped=mapped)
        assert (buf.fd is not None) == (mapped and hasattr(os, "memfd_create"))
        memoryview(buf.memory)[:] = data
        assert torch.equal(buf.load_torch()["w"], tensors["big.pt"]["w"])
        assert buf.memory is None and buf.fd is None
