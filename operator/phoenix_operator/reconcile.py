"""One pass for one PhoenixJob: gather its facts, ``decide``, apply the plan.

The parts are elsewhere, one job each: ``workqueue`` (coalescing, one pass per job at a
time, timers, backoff, resync), ``gather`` (the facts, as one snapshot), ``decide`` (pure),
``apply`` (the plan's writes, in their documented order). The ``Reconciler`` wires them
together, turns a pass's end into the next one's time (backoff on failure, at once on a
conflict) and counts passes; ``main``'s handlers call ``poke``, ``poke_node``, ``remember``
and ``forget``.

With several replicas (``leader``) every replica's handlers keep calling these - so a
standby knows every job and its pods' tombstones - but only the leader's passes run: a
standby's pass returns at once, and when it becomes the leader it queues every job it knows
(``lead``), acting within one pass instead of one resync.

decide runs twice when it must: first without storage listings; if the plan asks for them
(``needs_checkpoints``) they are gathered and it runs again with them (why: the ``decide``
package docstring).
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable

from kubernetes.client.rest import ApiException

from . import prometheus
from .apply import LOST_LEADERSHIP, Applier, RetryLater
from .config import OperatorConfig
from .decide import Plan, decide
from .gather import Gather, Key, Tombstones
from .kube import Kube
from .leader import Leadership
from .phoenixjob import JobSpec, RecoverySpec
from .workqueue import Backoff, WorkQueue

log = logging.getLogger("phoenix.reconcile")

def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Reconciler:
    def __init__(self, kube: Kube, config: OperatorConfig,
                 clock: Callable[[], datetime] = utcnow,
                 leadership: Leadership | None = None) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock
        self.leadership = leadership or Leadership()  # main swaps in the LeaseElector
        self.known: set[Key] = set()  # every job a handler named: queued when we lead
        self.executor = ThreadPoolExecutor(config.api_workers, thread_name_prefix="phoenix-api")
        self.jobs = prometheus.JobPhases()  # last seen status.phase (metrics, resync)
        # Per-job gauges only from the replica that writes (a standby's would be stale).
        prometheus.JOB_STATUS.leading = lambda: self.leadership.holds()
        self.tombstones = Tombstones()
        self.gather = Gather(kube, config, self.call, self.tombstones)
        self.applier = Applier(kube, self.call, lambda: self.clock(), self.gather,
                               self._applied, lambda: self.leadership)
        # At most this many passes gather facts at once (controller-runtime's
        # MaxConcurrentReconciles): the API threads are the bottleneck anyway, and without a
        # bound every poked job (500 at a resync) holds its job and pods as JSON while it
        # waits for a thread - a peak the allocator keeps as RSS (+110 MB with 500 jobs,
        # benchmarks/bench_scale.py).
        self.queue: WorkQueue[Key] = WorkQueue(self._pass, max_concurrent=2 * config.api_workers,
                                               backoff=Backoff(initial=1.0, maximum=300.0))

    async def call(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    def _applied(self, job: dict, plan: Plan) -> None:
        meta = job["metadata"]
        self.jobs.set((meta["namespace"], meta["name"]), plan.status.get("phase", ""))
        budget = ((job.get("spec") or {}).get("recovery") or {}).get("maxFailures")
        prometheus.JOB_STATUS.set(meta["namespace"], meta["name"], plan.status,
                                  int(budget if budget is not None else RecoverySpec.max_failures))
        prometheus.start_job_counters(meta["namespace"], meta["name"])

    # --- triggering (main's handlers) ------------------------------------------------------
    def poke(self, key: Key) -> None:
        """Ask for a pass; a no-op if one is already queued for this job."""
        self.known.add(key)
        self.queue.add(key)

    def lead(self) -> None:
        """This replica has just become the leader: a pass for every job it knows."""
        for key in list(self.known | set(self.jobs)):
            self.queue.add(key)

    def remember(self, key: Key, pod: dict) -> None:
        self.tombstones.remember(key, pod)

    def poke_node(self, node: str) -> None:
        """A node went away or NotReady: look at every job with a pod seen on it."""
        for key in self.tombstones.jobs_on_node(node):
            self.poke(key)

    def forget(self, key: Key) -> None:
        self.known.discard(key)
        self.tombstones.forget(key)
        self.gather.heartbeats.forget(key)
        self.queue.forget(key)
        prometheus.forget_job(*key)
        prometheus.JOB_STATUS.forget(*key)
        self.jobs.forget(key)

    async def resync_forever(self) -> None:
        await self.queue.resync_forever(self.config.resync_seconds, lambda: self.jobs)

    # --- one pass --------------------------------------------------------------------------
    async def _pass(self, key: Key) -> float | None:
        """The queue's ``reconcile``: one pass, its result counted, and when to come back."""
        backoff = self.queue.backoff
        if not self.leadership.holds():
            return None  # a standby: the leader acts; ``lead`` queues it if we take over
        started = time.monotonic()
        try:
            requeue = await self.reconcile(*key)
            backoff.success(key)
            prometheus.RECONCILES.labels("ok").inc()
        except LOST_LEADERSHIP as e:  # the lease moved mid-pass: the new leader acts
            prometheus.RECONCILES.labels("not_leader").inc()
            log.info("[%s/%s] pass stopped, not the leader any more: %s", *key, e)
            requeue = None
        except RetryLater as e:  # already reported (event, log)
            prometheus.RECONCILES.labels("retry").inc()
            requeue = backoff.failure(key)
            log.info("[%s/%s] %s; retrying in %gs", *key, e, requeue)
        except ApiException as e:
            prometheus.RECONCILES.labels("conflict" if e.status == 409 else "api_error").inc()
            # A conflict is optimistic concurrency doing its job: decide again at once.
            requeue = 0.2 if e.status == 409 else backoff.failure(key)
            if e.status != 409:
                log.warning("[%s/%s] API error %s %s; retrying in %gs", *key, e.status,
                            e.reason, requeue)
        except Exception:  # noqa: BLE001 - one job's bug must not stop the others
            prometheus.RECONCILES.labels("error").inc()
            requeue = backoff.failure(key)
            log.exception("[%s/%s] reconcile failed; retrying in %gs", *key, requeue)
        finally:
            prometheus.RECONCILE_SECONDS.observe(time.monotonic() - started)
        return requeue

    async def reconcile(self, namespace: str, name: str) -> float | None:
        job = await self.gather.job(namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            self.forget((namespace, name))
            return None
        facts = await self.gather.facts(job)
        progress = await self.gather.progress(facts)
        pulls = await self.gather.image_pulls(job, facts.pods, self.clock())
        plan = decide(job, facts.pods, facts.listings, self.clock(), facts.nodes, facts.foreign,
                      spec=facts.spec, progress=progress, pulls=pulls)
        if plan.needs_checkpoints:
            facts = await self.gather.listings(facts, plan.needs_checkpoints)
            plan = decide(job, facts.pods, facts.listings, self.clock(), facts.nodes,
                          facts.foreign, spec=facts.spec, progress=progress, pulls=pulls)
        return await self.applier.apply(job, facts.spec, plan)

    async def apply(self, job: dict, plan: Plan, spec: JobSpec | None = None) -> float | None:
        """Apply ``plan`` for ``job`` (``spec``: its parsed spec, parsed here if not given)."""
        spec = spec if spec is not None else JobSpec.parse(job.get("spec") or {})
        return await self.applier.apply(job, spec, plan)
