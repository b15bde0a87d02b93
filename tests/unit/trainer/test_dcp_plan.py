"""dcp_storage's pure parts: which blocks a restore reads for the items its load plan asks
for (``plan_runs``), and the block checksums a save records as it streams (``BlockHashes``)."""
from __future__ import annotations

import io
import random
import zlib

import pytest

from phoenix_trainer.core.errors import CorruptCheckpointError
from phoenix_trainer.dcp_storage import BlockHashes, Run, plan_runs

pytestmark = pytest.mark.unit


def test_items_whose_blocks_touch_share_one_block_aligned_run():
    runs = plan_runs("f", [(10, 5, "b"), (0, 10, "a"), (100, 3, "c"), (50, 1, "d")], 200, 16, 1000)
    assert runs == [Run("f", 0, 16, ((0, 10, "a"), (10, 5, "b"))),
                    Run("f", 48, 64, ((50, 1, "d"),)),
                    Run("f", 96, 112, ((100, 3, "c"),))]


def test_adjacent_blocks_merge_and_the_last_run_ends_at_the_objects_end():
    runs = plan_runs("f", [(0, 20, "a"), (20, 20, "b"), (40, 5, "c")], 45, 16, 1000)
    assert runs == [Run("f", 0, 45, ((0, 20, "a"), (20, 20, "b"), (40, 5, "c")))]


def test_a_run_stops_at_the_cap_and_an_item_bigger_than_it_gets_its_own():
    runs = plan_runs("f", [(0, 16, "a"), (16, 16, "b"), (32, 100, "c"), (132, 4, "d")], 136, 16, 32)
    assert [(r.start, r.end, [i[2] for i in r.items]) for r in runs] == \
        [(0, 32, ["a", "b"]), (32, 136, ["c"]), (128, 136, ["d"])]  # the shared block twice


def test_every_item_lies_inside_its_runs_bytes():
    rng = random.Random(5)
    offsets = sorted(rng.sample(range(0, 10_000), 40))
    items = [(o, rng.randint(0, 300), i) for i, o in enumerate(offsets)]
    size = max(o + n for o, n, _ in items) + 7
    runs = plan_runs("f", items, size, 64, 512)
    assert sorted(i for r in runs for i in r.items) == sorted(items)
    for r in runs:
        assert r.start % 64 == 0 and (r.end % 64 == 0 or r.end == size)
        assert all(r.start <= o and o + n <= r.end for o, n, _ in r.items)
        assert r.size <= 512 or len(r.items) == 1


def test_an_item_outside_its_object_is_a_corrupt_checkpoint():
    with pytest.raises(CorruptCheckpointError, match="outside"):
        plan_runs("f", [(40, 10, "a")], 45, 16, 100)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_block_checksums_are_each_blocks_crc32_whatever_the_writes(block):
    data = random.Random(block).randbytes(1000)
    sink = io.BytesIO()
    out = BlockHashes(sink, block)
    pos, rng = 0, random.Random(1)
    while pos < len(data):
        n = rng.randint(0, 150)
        out.write(data[pos:pos + n])
        pos += n
    assert sink.getvalue() == data and out.n == len(data)
    assert out.finish() == ["%08x" % zlib.crc32(data[i:i + block])
                            for i in range(0, len(data), block)]
