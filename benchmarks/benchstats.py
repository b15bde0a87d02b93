"""Summaries the benchmarks report: percentiles by linear interpolation (numpy's default)
and one dict shape for a list of samples. Pure; unit-tested in tests/unit/test_benchstats.py.
"""
from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of ``values``, interpolating between neighbours; NaN for
    no values."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} is not within [0, 1]")
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: list[float], samples: bool = True) -> dict:
    """n, p50, p95, mean, min, max (and the samples, rounded) of ``values``."""
    out = {"n": len(values), "p50": percentile(values, 0.5), "p95": percentile(values, 0.95),
           "mean": statistics.fmean(values) if values else None,
           "min": min(values) if values else None, "max": max(values) if values else None}
    if samples:
        out["samples"] = [round(v, 4) for v in values]
    return out


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded to 1 decimal, None if either is missing or the
    denominator is not positive."""
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return round(numerator / denominator, 1)
