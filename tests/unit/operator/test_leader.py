"""Leader election's decisions (``next_record``, pure) and its gate (``LeaseElector.holds``,
``write``) with a stepped clock. The loop against a real API server: tests/cluster/
test_leader_election.py."""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from phoenix_operator.leader import (
    LeaseElector, LeaseRecord, Leadership, NotLeader, next_record,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 5, 12, 0, 0, tzinfo=timezone.utc)


def held(holder="op-a", transitions=3):
    return LeaseRecord(holder=holder, duration=15, acquire_time="a", renew_time="r",
                       transitions=transitions, uid="L1", resource_version="7")


def test_no_lease_yet_creates_it_in_term_zero():
    rec = next_record(None, "op-a", False, False, NOW, 15)
    assert (rec.holder, rec.transitions, rec.duration) == ("op-a", 0, 15)
    assert rec.renew_time == rec.acquire_time == "2026-12-05T12:00:00.000000Z"


def test_the_leader_renews_in_the_same_term():
    rec = next_record(held(), "op-a", True, False, NOW, 15)
    assert (rec.holder, rec.transitions, rec.acquire_time) == ("op-a", 3, "a")
    assert rec.renew_time != "r" and rec.resource_version == "7"


def test_a_standby_waits_for_a_live_lease_and_takes_an_expired_one_in_a_new_term():
    assert next_record(held(), "op-b", False, False, NOW, 15) is None
    rec = next_record(held(), "op-b", False, True, NOW, 15)
    assert (rec.holder, rec.transitions) == ("op-b", 4)


def test_a_released_lease_is_taken_at_once():
    rec = next_record(held(holder=""), "op-b", False, False, NOW, 15)
    assert (rec.holder, rec.transitions) == ("op-b", 4)


def test_our_own_name_from_a_previous_process_is_a_new_term():
    """The container restarted: the old process's writes in flight are not ours."""
    rec = next_record(held(), "op-a", False, False, NOW, 15)
    assert (rec.holder, rec.transitions) == ("op-a", 4)


class MemoryLeases:
    """``Kube``'s Lease calls over a dict (pure logic under test; the real API server in the
    cluster tests)."""

    def __init__(self):
        self.lease = None
        self.version = 0
        self.events = []
        self.fail = False

    def _check(self):
        if self.fail:
            raise ConnectionError("apiserver unreachable")

    def get_lease(self, namespace, name):
        self._check()
        return self.lease

    def _write(self, spec):
        self.version += 1
        self.lease = {"metadata": {"name": "lease", "uid": "L1",
                                   "resourceVersion": str(self.version)}, "spec": spec}
        return self.lease

    def create_lease(self, namespace, name, spec):
        self._check()
        return self._write(spec)

    def replace_lease(self, lease, spec, resource_version):
        self._check()
        assert resource_version == str(self.version)
        return self._write(spec)

    def post_event(self, obj, type_, reason, message):
        self.events.append(reason)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


async def direct(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def elector(api, clock, name="op-a", **kw):
    return LeaseElector(api, direct, namespace="ns", name="lease", identity=name,
                        duration=15, renew_deadline=10, retry=2, monotonic=clock, **kw)


def test_the_gate_closes_at_the_renew_deadline_before_anyone_may_take_over():
    async def scenario():
        api, clock, led = MemoryLeases(), Clock(), []
        a = elector(api, clock, on_lead=lambda: led.append("a"))
        b = elector(api, clock, "op-b")
        assert await a.try_once() and a.holds() and led == ["a"]
        assert a.term.term == 0 and a.term.leader == "op-a" and a.term.lease_uid == "L1"
        assert not await b.try_once() and not b.holds() and b.holder == "op-a"
        assert await a.write(direct, lambda: "written") == "written"
        api.fail = True  # a is cut off from the API server
        clock.t += 9.9
        await a.try_once()
        assert a.holds()  # the renewal failed, but it is still inside its deadline
        clock.t += 0.2
        assert not a.holds()
        with pytest.raises(NotLeader, match="op-a does not hold lease ns/lease"):
            await a.write(direct, lambda: "written")
        api.fail = False
        clock.t += 4.0  # 14.1 s since b saw the record change: not yet
        assert not await b.try_once()
        clock.t += 1.0
        assert await b.try_once() and b.holds() and b.term.term == 1
        await a.try_once()  # a sees b's name: it stays a standby
        assert not a.leading and not a.holds()
    asyncio.run(scenario())


def test_release_hands_over_without_the_wait_and_waits_for_writes_in_flight():
    async def scenario():
        api, clock = MemoryLeases(), Clock()
        a, b = elector(api, clock), elector(api, clock, "op-b")
        await a.try_once()
        await b.try_once()
        gate = asyncio.Event()

        async def slow(fn):
            await gate.wait()
            return fn()

        write = asyncio.create_task(a.write(slow, lambda: "late"))
        await asyncio.sleep(0)
        release = asyncio.create_task(a.release())
        await asyncio.sleep(0.1)
        assert not release.done() and not a.holds()  # closed for new writes, waiting
        gate.set()
        assert await write == "late"
        await release
        assert api.lease["spec"]["holderIdentity"] is None
        assert "LeaderReleased" in api.events
        assert await b.try_once() and b.term.term == 1  # no 15 s wait
    asyncio.run(scenario())


def test_a_standalone_operator_always_writes_unordered():
    async def scenario():
        lone = Leadership()
        assert lone.holds() and not lone.term
        assert await lone.write(direct, lambda: 1) == 1
    asyncio.run(scenario())


def lease(holder, renewed, transitions=2, acquired="2026-12-05T11:58:00.000000Z"):
    return {"metadata": {"name": "phoenix", "namespace": "phoenix-system"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "acquireTime": acquired, "renewTime": renewed,
                     "leaseTransitions": transitions}}


def test_phoenix_status_says_who_leads_from_the_lease():
    from phoenix_operator.kubectl_phoenix import leader_line
    from phoenix_operator.leader import describe_lease
    live = describe_lease(lease("phoenix-7d9-a", "2026-12-05T11:59:58.000000Z"), NOW)
    assert live == {"lease": "phoenix-system/phoenix", "leader": "phoenix-7d9-a", "term": 2,
                    "since": "2026-12-05T11:58:00.000000Z",
                    "renewed": "2026-12-05T11:59:58.000000Z", "expired": False}
    assert leader_line([live], NOW) == (
        "  operator: leader phoenix-7d9-a (term 2, since 2m ago, lease phoenix-system/phoenix)")
    dead = describe_lease(lease("phoenix-7d9-a", "2026-12-05T11:59:30.000000Z"), NOW)
    assert dead["expired"] and "not renewed since 30s ago: a standby takes over" in leader_line(
        [dead], NOW)
    released = describe_lease(lease(None, "2026-12-05T11:59:59.000000Z", 3,
                                    "2026-12-05T11:59:59.000000Z"), NOW)
    assert leader_line([released], NOW) == (
        "  operator: no leader (lease phoenix-system/phoenix released 1s ago, term 3)")
    assert "standalone" in leader_line([], NOW)
    assert leader_line("cannot read the operator's Lease: 403 Forbidden", NOW) == (
        "  operator: cannot read the operator's Lease: 403 Forbidden")


def test_election_settings_are_checked_at_start():
    from phoenix_operator.config import ConfigError, OperatorConfig
    on = {"PHOENIX_LEADER_ELECTION": "true", "PHOENIX_LEASE_NAMESPACE": "phoenix-system",
          "PHOENIX_POD_NAME": "phx-7d9-a"}
    config = OperatorConfig.from_env(on)
    assert (config.leader_election, config.identity, config.lease_name) == (
        True, "phx-7d9-a", "phoenix-operator")
    assert (config.lease_duration, config.renew_deadline, config.retry_period) == (15, 10, 2)
    assert not OperatorConfig.from_env({}).leader_election  # a bare process: standalone
    with pytest.raises(ConfigError, match="needs PHOENIX_LEASE_NAMESPACE"):
        OperatorConfig.from_env({"PHOENIX_LEADER_ELECTION": "true"})
    with pytest.raises(ConfigError, match="RETRY_PERIOD_SECONDS < .*RENEW_DEADLINE_SECONDS < "):
        OperatorConfig.from_env(dict(on, PHOENIX_RENEW_DEADLINE_SECONDS="20"))
