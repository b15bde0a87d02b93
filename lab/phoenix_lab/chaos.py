"""Disruptions a spot fleet inflicts on training jobs, injectable into the lab on demand.

Shared by the demo, the chaos suite and the goodput benchmark so that "an eviction" means
the same thing everywhere. `plan()` is pure (a seeded schedule); `Injector` acts on the lab.

| kind           | what happens                                              | trainer sees      | counts as     |
|----------------|-----------------------------------------------------------|-------------------|---------------|
| evict          | Eviction API (DisruptionTarget, graceful delete)          | SIGTERM + grace   | preemption    |
| sigterm-short  | pod deleted by someone else with a 1 s grace              | SIGTERM, SIGKILL  | preemption    |
| sigkill        | the container's processes are SIGKILLed (exit 137)        | nothing           | preemption    |
| node-loss      | the Node object disappears, its processes die silently    | nothing           | preemption    |
| operator-kill  | the operator's process is SIGKILLed mid-recovery          | nothing           | nothing       |
| s3-outage      | the S3 server is stopped for a while, then restarted      | upload retries    | nothing       |
"""
from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

TRAINER_DISRUPTIONS = ("evict", "sigterm-short", "sigkill", "node-loss")
ALL_DISRUPTIONS = TRAINER_DISRUPTIONS + ("operator-kill", "s3-outage")


def is_preemption(kind: str) -> bool:
    return kind in TRAINER_DISRUPTIONS


def plan(seed: int, count: int, kinds: tuple[str, ...] = ALL_DISRUPTIONS) -> list[str]:
    """A seeded schedule of `count` disruptions that uses every kind at least once
    (when count allows) in a random order; at most one S3 outage (it costs 30 s)."""
    rng = random.Random(seed)
    base = list(kinds)[:count]
    pool = [k for k in kinds if k != "s3-outage"] or list(kinds)
    rest = [rng.choice(pool) for _ in range(count - len(base))]
    schedule = base + rest
    rng.shuffle(schedule)
    return schedule


@dataclass
class Injected:
    kind: str
    pod: str | None
    at: float  # time.time()
    detail: str = ""


@dataclass
class Injector:
    """Injects disruptions into the lab. `operator_kill` and `s3_down/s3_up` are supplied by
    whoever runs the operator and the S3 server (they differ between demo and tests)."""

    lab: object
    namespace: str
    operator_kill: Callable[[], str] | None = None
    s3_outage_seconds: float = 30.0
    log: list[Injected] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def inject(self, kind: str, pod: str | None, node: str | None = None) -> Injected:
        lab = self.lab
        detail = ""
        if kind == "evict":
            lab.evict(self.namespace, pod)
        elif kind == "sigterm-short":
            lab.kubectl("delete", "pod", pod, "-n", self.namespace, "--grace-period=1", "--wait=false")
        elif kind == "sigkill":
            lab.kill_pod(self.namespace, pod, signal.SIGKILL)
        elif kind == "node-loss":
            lab.lose_node(node)
            detail = f"node {node}"
        elif kind == "operator-kill":
            if self.operator_kill is None:
                raise ValueError("operator-kill needs an operator_kill callback")
            detail = self.operator_kill()
        elif kind == "s3-outage":
            lab.s3_server.stop()
            t = threading.Thread(target=self._restore_s3, daemon=True, name="s3-restore")
            t.start()
            self._threads.append(t)
            detail = f"S3 down for {self.s3_outage_seconds:.0f}s"
        else:
            raise ValueError(f"unknown disruption {kind!r}; one of {ALL_DISRUPTIONS}")
        record = Injected(kind, pod, time.time(), detail)
        self.log.append(record)
        return record

    def _restore_s3(self) -> None:
        time.sleep(self.s3_outage_seconds)
        self.lab.s3_server.start()

    def s3_busy(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def wait_idle(self, timeout: float = 120) -> None:
        for t in self._threads:
            t.join(timeout)
