"""How healthy a trainer pod's node is, as a fact for ``outcomes`` and ``decide``. Pure:
reads a Node dict as the API returns it (or None for a 404); never reads the API or the clock.

A node that is gone or tainted ``node.kubernetes.io/out-of-service`` is *dead*: nothing runs
its pods any more. One that is merely NotReady is not: a partitioned kubelet keeps running
the trainer, so its pod is *stranded* (said, never replaced) once the grace is over. A
*notice* is a taint or condition announcing the node's reclaim.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping

from . import constants as C
from .constants import DELETED_KEY
from .phoenixjob import parse_ts


@dataclass(frozen=True)
class NodeHealth:
    """What the caller saw of the node a live pod is bound to: a fact for ``outcomes.classify``."""

    missing: bool = False                     # GET node answered 404
    not_ready_since: datetime | None = None   # Ready condition False/Unknown since then
    out_of_service: bool = False              # tainted node.kubernetes.io/out-of-service
    notice: str | None = None                 # a reclaim announced: "taint <key>" / "condition <type>"

    @property
    def healthy(self) -> bool:
        return not self.missing and self.not_ready_since is None and not self.out_of_service

    @property
    def dead(self) -> bool:
        """Nothing can still run a pod there: safe to force-delete it and start another."""
        return self.missing or self.out_of_service


def node_health(node: Mapping[str, Any] | None,
                notice_taints: Iterable[str] = C.DEFAULT_NOTICE_TAINTS,
                notice_conditions: Iterable[str] = C.DEFAULT_NOTICE_CONDITIONS) -> NodeHealth:
    """``node`` as the API returned it, or None for 404. A Ready condition that is not True
    counts from its lastTransitionTime; without one we cannot tell, so: not NotReady.
    ``notice``: the first of ``notice_taints`` on the node, else the first of
    ``notice_conditions`` that is True."""
    if node is None:
        return NodeHealth(missing=True)
    taints = (node.get("spec") or {}).get("taints") or ()
    out = any(t.get("key") == C.TAINT_OUT_OF_SERVICE for t in taints)
    conditions = (node.get("status") or {}).get("conditions") or ()
    since = None
    for cond in conditions:
        if cond.get("type") == "Ready" and cond.get("status") != "True":
            since = parse_ts(cond.get("lastTransitionTime"))
    keys = {t.get("key") for t in taints}
    true = {c.get("type") for c in conditions if c.get("status") == "True"}
    notice = next((f"taint {k}" for k in notice_taints if k in keys), None) or next(
        (f"condition {c}" for c in notice_conditions if c in true), None)
    return NodeHealth(not_ready_since=since, out_of_service=out, notice=notice)


def _not_ready(pod: Mapping[str, Any], nodes: Mapping[str, NodeHealth]) -> tuple[str, NodeHealth] | None:
    node = (pod.get("spec") or {}).get("nodeName") or ""
    health = nodes.get(node)
    if pod.get(DELETED_KEY) or health is None or health.dead or health.not_ready_since is None:
        return None
    return node, health


def node_grace_left(pod: Mapping[str, Any], nodes: Mapping[str, NodeHealth], now: datetime,
                    node_grace: float) -> float | None:
    """Seconds until a live pod on a NotReady node counts as stranded (None: not waiting)."""
    found = _not_ready(pod, nodes)
    if found is None:
        return None
    left = node_grace - (now - found[1].not_ready_since).total_seconds()
    return left if left > 0 else None


def stranded(pod: Mapping[str, Any], nodes: Mapping[str, NodeHealth], now: datetime,
             node_grace: float) -> str | None:
    """Why a live pod is neither running for sure nor replaceable: its node has been NotReady
    longer than ``node_grace`` but is neither gone nor tainted out-of-service. None if not."""
    found = _not_ready(pod, nodes)
    if found is None or (now - found[1].not_ready_since).total_seconds() <= node_grace:
        return None
    node, health = found
    return (f"pod {(pod.get('metadata') or {}).get('name', '')} is on node {node}, NotReady "
            f"since {health.not_ready_since.strftime('%Y-%m-%dT%H:%M:%SZ')}: it is not replaced "
            f"while its trainer may still run; delete the Node or taint it "
            f"{C.TAINT_OUT_OF_SERVICE}=nodeshutdown:NoExecute once the machine is down")


