"""kopf entry point: settings and thin handlers only. Run with

    kopf run -m phoenix_operator.main --all-namespaces --standalone \
        --liveness=http://0.0.0.0:8081/healthz

Every handler just says "this job may need attention" to the Reconciler; what to do is
decided in ``decide`` and done in ``reconcile`` (gather, decide, apply). No finalizers, no kopf progress
annotations: ``on.event`` handlers keep nothing on the objects.

With ``PHOENIX_LEADER_ELECTION=true`` (the chart's default, 2 replicas) kopf still runs
``--standalone`` (its own peering pauses replicas by priority, without a lease) and the
operator elects its leader itself (``leader``): every replica watches, only the leader writes.
On shutdown (SIGTERM: a drain, a rolling update) the leader releases the Lease at once.
"""
from __future__ import annotations

import asyncio
import logging

import kopf

from . import constants as C
from . import prometheus
from .node_health import node_health
from .config import OperatorConfig
from .kube import Kube, load_config
from .leader import LeaseElector
from .gather import tombstone
from .reconcile import Reconciler

log = logging.getLogger("phoenix.operator")


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings, in one place."""
    # Handler log lines would otherwise become Events on pods; we post our own, curated.
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True  # safety: intent-first status + deterministic names
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
    # Only Phoenix's pods, filtered by the API server: the handler's labels= filter alone is
    # applied client-side, after every pod in the cluster was streamed to us and parsed.
    settings.watching.label_selectors["v1", "pods"] = C.POD_WATCH_SELECTOR


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    config = OperatorConfig.from_env()
    configure(settings)
    load_config(pool_size=config.api_workers)
    kube = Kube(user_agent=f"{C.MANAGED_BY}/{config.identity}")
    reconciler = Reconciler(kube, config)
    memo.reconciler = reconciler
    if config.watch_nodes:
        # Registered here, not at import, so PHOENIX_WATCH_NODES=false (no RBAC on nodes)
        # means no watch at all; kopf starts watching only after startup handlers.
        kopf.on.event("", "v1", "nodes")(node_event)
    loop = asyncio.get_running_loop()
    if config.leader_election:
        elector = LeaseElector(
            kube, namespace=config.lease_namespace,
            name=config.lease_name, identity=config.identity, duration=config.lease_duration,
            renew_deadline=config.renew_deadline, retry=config.retry_period,
            on_lead=reconciler.lead)
        reconciler.leadership = elector
        memo.election = loop.create_task(elector.run())
    memo.resync = loop.create_task(reconciler.resync_forever())
    prometheus.serve(config.metrics_port, config.metrics_host)
    log.info("phoenix operator started: %s", config)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_) -> None:
    for name in ("resync", "election"):  # no renewal racing the release below
        task = memo.get(name)
        if task is not None:
            task.cancel()
    reconciler = memo.get("reconciler")
    if reconciler is not None and isinstance(reconciler.leadership, LeaseElector):
        await reconciler.leadership.release()  # a standby takes over now, not in 15 s


@kopf.on.event(C.GROUP, C.VERSION, C.PLURAL)
async def job_event(type: str, name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    if type == "DELETED":
        memo.reconciler.forget((namespace, name))
    else:
        memo.reconciler.poke((namespace, name))


async def node_event(type: str, name: str, body: kopf.Body, memo: kopf.Memo, **_) -> None:
    """A deleted, not-Ready or reclaim-announcing node concerns the jobs with pods on it:
    look at them now."""
    health = node_health(None if type == "DELETED" else body, memo.reconciler.config.notice_taints,
                         memo.reconciler.config.notice_conditions)
    if not health.healthy or health.notice:
        memo.reconciler.poke_node(name)


@kopf.on.event("", "v1", "pods", labels={C.LABEL_JOB: kopf.PRESENT})
async def pod_event(body: kopf.Body, labels: dict, namespace: str, memo: kopf.Memo,
                    **_) -> None:
    key = (namespace, labels[C.LABEL_JOB])
    memo.reconciler.remember(key, tombstone(body))
    memo.reconciler.poke(key)
