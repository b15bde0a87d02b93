"""Reconciler: a burst of pokes (a resync of every job) runs at most 2 x api_workers passes
at once; the rest wait before gathering any facts."""
import asyncio

import pytest

from phoenix_operator.config import OperatorConfig
from phoenix_operator.reconcile import Reconciler

pytestmark = pytest.mark.unit


def test_a_burst_of_pokes_is_bounded():
    reconciler = Reconciler(kube=None, config=OperatorConfig(api_workers=3))
    running, peak, done = 0, 0, []

    async def reconcile(ns, name):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)  # waiting on the API
        running -= 1
        done.append(name)
        return None

    reconciler.reconcile = reconcile

    async def main():
        for i in range(40):
            reconciler.poke(("ns", f"j{i}"))
        while len(done) < 40:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert peak == 6
    assert sorted(done) == sorted(f"j{i}" for i in range(40))
