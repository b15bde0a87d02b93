"""The benchmarks' summary helpers (benchmarks/benchstats.py)."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from benchstats import percentile, ratio, summary  # noqa: E402

pytestmark = pytest.mark.unit


def test_percentile_interpolates_between_neighbours():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 1) == 4.0
    assert percentile(xs, 0.5) == 2.5
    assert percentile(xs, 0.95) == pytest.approx(3.85)


def test_percentile_of_one_and_none():
    assert percentile([7.0], 0.95) == 7.0
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError):
        percentile([1.0], 95)


def test_summary_and_ratio():
    s = summary([1.0, 2.0, 3.0])
    assert (s["n"], s["p50"], s["min"], s["max"], s["mean"]) == (3, 2.0, 1.0, 3.0, 2.0)
    assert s["samples"] == [1.0, 2.0, 3.0]
    assert "samples" not in summary([1.0], samples=False)
    assert summary([])["mean"] is None
    assert ratio(30.0, 0.25) == 120.0
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None


def test_ab_alternates_and_compares_medians():
    from ab import compare, numeric_leaves, order
    assert order(3) == ["base", "new", "new", "base", "base", "new"]
    assert numeric_leaves({"a": {"b": 2, "ok": True, "samples": [1, 2]}, "c": "x", "d": 1.5}) \
        == {"a.b": 2.0, "d": 1.5}
    base = [{"t": 1.0, "only_base": 3}, {"t": 3.0, "only_base": 3}]
    new = [{"t": 2.0}, {"t": 4.0}]
    assert compare(base, new) == {"t": {"base_median": 2.0, "new_median": 3.0,
                                        "new_over_base": 1.5}}


def test_bench_operator_runs_from_the_tree_it_is_told():
    from benchlab import operator_env
    assert "PYTHONPATH" not in operator_env({"X": "1"})
    env = operator_env({"PHOENIX_BENCH_OPERATOR_TREE": "/t"})
    assert env["PYTHONPATH"].split(":") == ["/t/operator", "/t/trainer_image"]
