"""Disruptions a spot fleet inflicts on training jobs, injectable into the lab on demand.

Shared by the demo, the chaos suite and the goodput benchmark so that "an eviction" means
the same thing everywhere. `plan()` is pure (a seeded schedule); `Injector` acts on the lab.

| kind           | what happens                                              | trainer sees      | counts as     |
|----------------|-----------------------------------------------------------|-------------------|---------------|
| evict          | Eviction API (DisruptionTarget, graceful delete)          | SIGTERM + grace   | preemption    |
| sigterm-short  | pod deleted by someone else with a 1 s grace              | SIGTERM, SIGKILL  | preemption    |
| sigkill        | the container is SIGKILLed through containerd (exit 137)  | nothing           | failure (*)   |
| node-loss      | kubelet, containerd and containers die silently, the Node | nothing           | preemption    |
|                | object is deleted and a replacement spot node registers   |                   |               |
| notice         | the pod's node is tainted karpenter.sh/disrupted (a spot  | a checkpoint      | preemption    |
|                | reclaim notice); after `notice_seconds` whatever still    | request, then a   |               |
|                | runs there is evicted without grace and the taint lifted  | handoff (standby) |               |
| operator-kill  | the leader operator pod's container is SIGKILLed in the   | nothing           | nothing       |
|                | middle of a recovery (a standby takes over)               |                   |               |
| s3-outage      | the S3 server is stopped for a while, then restarted      | upload retries    | nothing       |

(*) Nothing on the cluster says the kill came from outside: exit 137 alone is what a
liveness probe, activeDeadlineSeconds or a trainer killing itself leave too, so the operator
charges it to the failure budget (with backoff) rather than retry it as a preemption forever.

A lost node's replacement is waited for (Ready, GPUs advertised) in the background, as a
cloud's node pool would bring it back; `wait_idle` joins that and any S3 restore and says
what failed in them.
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
NOTICE = "notice"  # not in the chaos suite's schedule: it needs a job that acts on notices
NOTICE_TAINT = "karpenter.sh/disrupted"


def is_preemption(kind: str) -> bool:
    return kind in TRAINER_DISRUPTIONS and not is_failure(kind)


def is_failure(kind: str) -> bool:
    """Disruptions the operator counts against the failure budget (see the table)."""
    return kind == "sigkill"


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
    """Injects disruptions into the lab. `operator_kill` is supplied by whoever installed
    the operator (it knows the release's pods and which of them leads); `s3_server` is the
    S3 server an s3-outage stops (default the lab's versitygw; `Lab.s3_server_for`)."""

    lab: object
    namespace: str
    operator_kill: Callable[[], str] | None = None
    s3_server: object | None = None
    s3_outage_seconds: float = 30.0
    notice_seconds: float = 10.0
    log: list[Injected] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _s3_thread: threading.Thread | None = None

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
            replacement = lab.lose_node(node).name
            self._background(lambda: lab.wait_nodes_ready([replacement], timeout=180),
                             f"node-ready-{replacement}")
            detail = f"node {node}, replacement {replacement}"
        elif kind == NOTICE:
            lab.kubectl("taint", "nodes", node, f"{NOTICE_TAINT}:NoSchedule", "--overwrite")
            self._background(lambda: self._reclaim(node), f"reclaim-{node}")
            detail = f"node {node} tainted {NOTICE_TAINT}, reclaimed in {self.notice_seconds:.0f}s"
        elif kind == "operator-kill":
            if self.operator_kill is None:
                raise ValueError("operator-kill needs an operator_kill callback")
            detail = self.operator_kill()
        elif kind == "s3-outage":
            self._s3().stop()
            self._s3_thread = self._background(self._restore_s3, "s3-restore")
            detail = f"S3 down for {self.s3_outage_seconds:.0f}s"
        else:
            raise ValueError(f"unknown disruption {kind!r}; one of {ALL_DISRUPTIONS}")
        record = Injected(kind, pod, time.time(), detail)
        self.log.append(record)
        return record

    def _background(self, fn: Callable[[], object], name: str) -> threading.Thread:
        def run() -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported by wait_idle
                self.errors.append(f"{name}: {e}")
        t = threading.Thread(target=run, daemon=True, name=name)
        t.start()
        self._threads.append(t)
        return t

    def _reclaim(self, node: str) -> None:
        """The end of a notice: the node goes (its pods of this namespace evicted without
        grace) and a fresh one takes its place (the taint lifted)."""
        from kubernetes import client

        time.sleep(self.notice_seconds)
        try:
            with self.lab.api_client() as api:
                pods = client.CoreV1Api(api).list_namespaced_pod(
                    self.namespace, field_selector=f"spec.nodeName={node}").items
            for p in pods:
                if p.status.phase in ("Pending", "Running") and not p.metadata.deletion_timestamp:
                    self.lab.evict(self.namespace, p.metadata.name, grace_seconds=0)
        finally:
            self.lab.kubectl("taint", "nodes", node, f"{NOTICE_TAINT}:NoSchedule-", check=False)

    def _s3(self):
        return self.s3_server or self.lab.s3_server

    def _restore_s3(self) -> None:
        time.sleep(self.s3_outage_seconds)
        self._s3().start()

    def s3_busy(self) -> bool:
        return self._s3_thread is not None and self._s3_thread.is_alive()

    def wait_idle(self, timeout: float = 240) -> list[str]:
        """Wait for S3 restores and replacement nodes; what went wrong in them."""
        for t in self._threads:
            t.join(timeout)
        return list(self.errors)
