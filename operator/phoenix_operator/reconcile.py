"""Gather facts, call ``decide``, apply the plan. One reconcile at a time per job.

The ``Reconciler`` coalesces triggers (job events, pod events, backoff timers, periodic
resync) into at most one queued pass per job, serialised by a per-job lock, so a burst of
pod events costs one pass. Everything it knows comes from the API on each pass (job by GET,
pods by label LIST): nothing in memory is needed to be correct after a restart.

Order when applying: storage writes (a standby's promotion: the fence; requests to running
trainers: control.json), intent status (if creating), force-delete pods of lost nodes,
create pods, delete pods, write status, post events. If creating a pod fails the status is not
written, so status never names a pod that was not created; if writing status fails after a
pod was created, the next pass adopts the pod (see decide).

Node facts: for every live pod bound to a node, the node is read (GET, one per node per
pass) and its health handed to ``decide``; the node watch in ``main`` only makes the pass
happen promptly (``poke_node``).
"""
from __future__ import annotations

import asyncio
import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import kopf
from kubernetes.client.rest import ApiException

from . import prometheus
from .constants import DELETED_KEY
from .node_health import NodeHealth, node_health
from .outcomes import bare_kill
from .backoff import Backoff
from .config import OperatorConfig
from . import constants as C
from .decide import CreatePod, Listing, Plan, decide
from .facts import scan, write_control, write_fence
from .kube import ForeignPod, Kube, describe_owner
from .phoenixjob import JobSpec, parse_ts, phase_statuses, ts

log = logging.getLogger("phoenix.reconcile")

Key = tuple[str, str]  # (namespace, name)


TOMBSTONE_METADATA = ("name", "namespace", "uid", "labels", "annotations", "ownerReferences",
                      "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")


def tombstone(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator keeps of a pod's last watched state: what ``decide`` and
    ``outcomes.classify`` read of a pod that has since vanished (identity, node, container names,
    status), a copy. Not the rest: a pod's managedFields and full spec are most of its size,
    and one is kept per trainer pod (500 jobs: tens of MB)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    slim = {"metadata": {k: meta[k] for k in TOMBSTONE_METADATA if k in meta},
            "spec": {"containers": [{"name": c.get("name")} for c in spec.get("containers") or ()]},
            "status": pod.get("status") or {}}
    if spec.get("nodeName"):
        slim["spec"]["nodeName"] = spec["nodeName"]
    return copy.deepcopy(slim)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class RetryLater(Exception):
    """The pass stopped for a reason it has already reported (Event, log): try again after
    this job's backoff."""


class StorageAccessError(Exception):
    """The job's checkpoint storage cannot be reached with what the cluster gives us."""


def _owned(pod: dict, uid: str | None) -> bool:
    """Pods of an earlier PhoenixJob with the same name (still being garbage collected)
    are not ours."""
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return not uid or any(r.get("uid") == uid for r in refs)


class Reconciler:
    def __init__(self, kube: Kube, config: OperatorConfig,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock
        self.executor = ThreadPoolExecutor(config.api_workers, thread_name_prefix="phoenix-api")
        self.known: dict[Key, str] = {}  # key -> last seen status.phase (metrics, resync)
        self._locks: dict[Key, asyncio.Lock] = {}
        # At most this many passes gather facts at once (controller-runtime's
        # MaxConcurrentReconciles): the API threads are the bottleneck anyway, and without a
        # bound every poked job (500 at a resync) holds its job and pods as JSON while it
        # waits for a thread - a peak the allocator keeps as RSS (+110 MB with 500 jobs,
        # benchmarks/bench_scale.py).
        self._slots = asyncio.Semaphore(2 * config.api_workers)
        self._queued: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        # Last state the watch showed of each trainer pod, per job. A pod missing from the
        # (authoritative) LIST is gone; its last state keeps the DisruptionTarget condition
        # and exit code the vanished pod can no longer show. Only an aid: after a restart
        # it is empty and a vanished pod counts as PodDeleted.
        self.tombstones: dict[Key, dict[str, dict]] = {}
        self._node_read_warned = False
        self.fence_writer = write_fence  # replaceable in tests
        self.control_writer = write_control
        self.backoff = Backoff(initial=1.0, maximum=300.0)

    async def _call(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    # --- triggering ----------------------------------------------------------------------
    def poke(self, key: Key) -> None:
        """Ask for a pass; a no-op if one is already queued for this job."""
        if key in self._queued:
            return
        self._queued.add(key)
        task = asyncio.get_running_loop().create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def poke_later(self, key: Key, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        old = self._timers.get(key)
        if old is not None and not old.cancelled() and old.when() <= when:
            return
        if old is not None:
            old.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.poke(key)

    def remember(self, key: Key, pod: dict) -> None:
        seen = self.tombstones.setdefault(key, {})
        name = pod["metadata"]["name"]
        seen.pop(name, None)
        seen[name] = pod
        while len(seen) > 16:
            seen.pop(next(iter(seen)))

    def poke_node(self, node: str) -> None:
        """A node went away or NotReady: look at every job with a pod seen on it."""
        for key, pods in list(self.tombstones.items()):
            if any((p.get("spec") or {}).get("nodeName") == node for p in pods.values()):
                self.poke(key)

    def forget(self, key: Key) -> None:
        self.known.pop(key, None)
        self.tombstones.pop(key, None)
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]
        prometheus.forget_job(*key)
        self.backoff.success(key)
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()
        self._update_job_gauge()

    async def resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for key in list(self.known):
                self.poke(key)

    async def _run(self, key: Key) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock, self._slots:
            self._queued.discard(key)  # after the wait: pokes until now are this pass's
            started = time.monotonic()
            try:
                requeue = await self.reconcile(*key)
                self.backoff.success(key)
                prometheus.RECONCILES.labels("ok").inc()
            except RetryLater as e:  # already reported (event, log)
                prometheus.RECONCILES.labels("retry").inc()
                requeue = self.backoff.failure(key)
                log.info("[%s/%s] %s; retrying in %gs", *key, e, requeue)
            except ApiException as e:
                prometheus.RECONCILES.labels("conflict" if e.status == 409 else "api_error").inc()
                # A conflict is optimistic concurrency doing its job: decide again at once.
                requeue = 0.2 if e.status == 409 else self.backoff.failure(key)
                if e.status != 409:
                    log.warning("[%s/%s] API error %s %s; retrying in %gs", *key, e.status,
                                e.reason, requeue)
            except Exception:  # noqa: BLE001 - one job's bug must not stop the others
                prometheus.RECONCILES.labels("error").inc()
                requeue = self.backoff.failure(key)
                log.exception("[%s/%s] reconcile failed; retrying in %gs", *key, requeue)
            finally:
                prometheus.RECONCILE_SECONDS.observe(time.monotonic() - started)
            if requeue is not None:
                self.poke_later(key, requeue)

    # --- one pass ------------------------------------------------------------------------
    async def reconcile(self, namespace: str, name: str) -> float | None:
        job = await self._call(self.kube.get_job, namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            self.forget((namespace, name))
            return None
        uid = job["metadata"].get("uid")
        pods = [p for p in await self._call(self.kube.list_pods, namespace, name)
                if _owned(p, uid)]
        present = {p["metadata"]["name"] for p in pods}
        last_seen = self.tombstones.get((namespace, name), {})
        pods += [{**p, DELETED_KEY: True} for n, p in last_seen.items()
                 if n not in present and _owned(p, uid)]
        nodes = await self._nodes(pods)
        foreign = await self._foreign(job, present)
        listings: dict[str, Listing] = {}
        plan = decide(job, pods, listings, self.clock(), nodes, foreign)
        if plan.needs_checkpoints:
            listings.update(await self._scan(job, plan.needs_checkpoints))
            plan = decide(job, pods, listings, self.clock(), nodes, foreign)
        return await self.apply(job, plan)

    async def _nodes(self, pods: list[dict]) -> dict[str, NodeHealth]:
        """Health of the nodes that pods still shown live are bound to."""
        if not self.config.watch_nodes:
            return {}
        # Pods shown live (is their node lost?) and pods killed by 137/143 with nothing else
        # to say why (a lost node is what would make that a preemption).
        names = sorted({n for p in pods if not p.get(DELETED_KEY)
                        and ((p.get("status") or {}).get("phase") in ("Pending", "Running")
                             or bare_kill(p))
                        and (n := (p.get("spec") or {}).get("nodeName"))})
        out: dict[str, NodeHealth] = {}
        for name in names:
            try:
                out[name] = node_health(await self._call(self.kube.get_node, name),
                                        self.config.notice_taints, self.config.notice_conditions)
            except ApiException as e:
                # Not knowing is not "lost": leave the pod to pod GC, as without this check.
                if not self._node_read_warned:
                    log.warning("cannot read node %s (%s %s); node loss will only be noticed "
                                "through pod GC. Grant get on nodes or set "
                                "PHOENIX_WATCH_NODES=false", name, e.status, e.reason)
                    self._node_read_warned = True
        return out

    async def _foreign(self, job: dict, present: set[str]) -> dict[str, str]:
        """Pods the status names but has no uid for (the create is pending or was refused
        with 409), that the LIST of our pods did not return: if they exist they are someone
        else's. One GET each; normally there are none."""
        ns, uid = job["metadata"]["namespace"], job["metadata"].get("uid")
        wanted = [p["pod"] for p in (job.get("status") or {}).get("phases") or ()
                  if p.get("pod") and not p.get("podUID") and p["pod"] not in present]
        out: dict[str, str] = {}
        for name in wanted:
            pod = await self._call(self.kube.get_pod, ns, name)
            if pod is not None and not _owned(pod, uid):
                out[name] = describe_owner(pod)
        return out

    async def _storage_access(self, job: dict) -> dict:
        """Credentials and endpoint for the job's checkpoint storage (keyword arguments of
        ``facts.scan``/``facts.write_fence``). Raises StorageAccessError saying why not."""
        spec = JobSpec.parse(job["spec"])
        ns, name = job["metadata"]["namespace"], spec.checkpoint.credentials_secret
        uri = spec.checkpoint.uri
        if uri.startswith("file://") and not self.config.allow_file_uris:
            raise StorageAccessError(
                f"checkpoint.uri {uri} is a path on the operator's own filesystem; this "
                "operator does not accept file:// URIs (PHOENIX_ALLOW_FILE_URIS, chart "
                "storage.allowFileURIs): use s3://")
        if not name and not uri.startswith("file://") and not self.config.may_use_own_identity(uri):
            # Invariant 4: without the job's credentials, the operator's own identity (the
            # chart invites workload identity) would list, read and write any prefix a
            # tenant names - someone else's included.
            raise StorageAccessError(
                f"checkpoint.uri {uri} has no credentialsSecret, and the operator may use its "
                "own identity only for the prefixes in PHOENIX_OWN_IDENTITY_PREFIXES (chart "
                "storage.operatorIdentityPrefixes): give the job a credentialsSecret, or ask "
                "the operator's admin to allow this prefix")
        access = secret = None
        if name:
            try:
                access, secret = await self._call(self.kube.s3_credentials, ns, name)
            except ApiException as e:
                raise StorageAccessError(
                    f"cannot read Secret {ns}/{name}: {e.status} {e.reason}") from e
        return {"access_key": access, "secret_key": secret,
                "endpoint": self.config.s3_endpoint_override or spec.checkpoint.endpoint}

    async def _scan(self, job: dict, phases: set[str]) -> dict[str, Listing]:
        spec = JobSpec.parse(job["spec"])
        try:
            access = await self._storage_access(job)
        except StorageAccessError as e:
            return {p: Listing(error=str(e)) for p in phases}
        statuses = phase_statuses(spec, job.get("status"))
        results = await asyncio.gather(*(
            self._call(scan, spec, p, **access,
                       skipped=statuses[p].skipped_steps if p in statuses else (),
                       deep=self.config.deep_verify)
            for p in sorted(phases)))
        uid = job["metadata"].get("uid") or ""
        return {p: await self._owner(listing, uid) for p, listing in zip(sorted(phases), results)}

    async def _owner(self, listing: Listing, uid: str) -> Listing:
        """A fence that names another job: whether that job (namespace/name, same uid) still
        exists. Not knowing (the fence names no job, the read is refused) is None, which
        refuses."""
        fence = listing.fence
        if fence is None or not fence.uid or fence.uid == uid:
            return listing
        namespace, _, name = fence.job.partition("/")
        live: bool | None = None
        if name:
            try:
                other = await self._call(self.kube.get_job, namespace, name)
                live = other is not None and other["metadata"].get("uid") == fence.uid
            except ApiException as e:
                log.warning("cannot read PhoenixJob %s (%s %s), which holds a checkpoint prefix",
                            fence.job, e.status, e.reason)
        return replace(listing, owner_live=live)

    async def _fence(self, job: dict, create: CreatePod) -> str | None:
        """Fence the phase's storage for ``create``'s attempt before its pod exists; returns
        why it could not (then the pod must not be created), or None."""
        try:
            access = await self._storage_access(job)
            meta = job["metadata"]
            await self._call(self.fence_writer, JobSpec.parse(job["spec"]), create.phase,
                             create.attempt, create.name, ts(self.clock()),
                             resume_from=create.resume_from, uid=meta.get("uid") or "",
                             job=f"{meta.get('namespace')}/{meta['name']}", clear_control=True,
                             **access)
        except Exception as e:  # noqa: BLE001 - any storage trouble: do not start, say why
            return f"{type(e).__name__}: {e}"[:300]
        return None

    async def _storage_writes(self, job: dict, plan: Plan, tag: str) -> None:
        """Promotions (the fence) and trainer requests (control.json), before the status
        that records them: a lost status write only makes the same write again."""
        spec = JobSpec.parse(job["spec"])
        meta = job["metadata"]
        owner = {"uid": meta.get("uid") or "", "job": f"{meta.get('namespace')}/{meta['name']}"}
        writes = [(f"promote attempt {p.attempt} of phase {p.phase}", lambda a, p=p: self.fence_writer(
                      spec, p.phase, p.attempt, p.pod, ts(self.clock()), resume_from=p.resume_from,
                      clear_control=True, **owner, **a))
                  for p in plan.promote]
        writes += [(f"write control.json of phase {c.phase}", lambda a, c=c: self.control_writer(
                       spec, c.phase, c.control, **a)) for c in plan.control]
        if not writes:
            return
        what = "read the storage credentials"
        try:
            access = await self._storage_access(job)
            for what, write in writes:
                await self._call(write, access)
                log.info("%s %s", tag, what)
        except Exception as e:  # noqa: BLE001 - any storage trouble: retry, say why
            msg = f"cannot {what}: {type(e).__name__}: {e}"[:400]
            log.warning("%s %s", tag, msg)
            await self._call(self.kube.post_event, job, "Warning", C.EV_STORAGE_ERROR, msg)
            raise RetryLater(msg) from e
        for p in plan.promote:
            if p.previous_end is not None:
                prometheus.REPLACEMENT_SECONDS.labels(p.previous_cause or "unknown").observe(
                    max(0.0, (self.clock() - p.previous_end).total_seconds()))

    async def apply(self, job: dict, plan: Plan) -> float | None:
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        tag = f"[{ns}/{name}]"
        status_written = False
        written = job
        uids: dict[str, str] = {}
        await self._storage_writes(job, plan, tag)
        if plan.create:
            # Intent first: if our view of the job is stale, this write fails (409) and we
            # create nothing; see decide's module docstring.
            written = await self._call(self.kube.patch_status, job, plan.status)
            status_written = True
        # The lost node's pod goes before its replacement comes: never two pod objects.
        for delete in (d for d in plan.delete if d.force):
            log.info("%s force-deleting pod %s (%s: its node is lost)", tag, delete.name,
                     delete.reason)
            await self._call(self.kube.delete_pod, ns, delete.name, 0)
        for service in plan.services:  # a gang's members resolve each other through it
            kopf.adopt(service, owner=job)
            await self._call(self.kube.ensure_service, ns, service)
        fenced: set[tuple[str, int]] = set()
        for create in plan.create:
            # One fence per attempt (a gang's members share it); a standby waits unfenced.
            skip = create.standby or (create.phase, create.attempt) in fenced
            why = None if skip else await self._fence(job, create)
            fenced.add((create.phase, create.attempt))
            if why is not None:
                msg = (f"phase {create.phase}: cannot write the storage fence for attempt "
                       f"{create.attempt} ({why}); not creating pod {create.name} while an "
                       f"older attempt could still write; retrying with backoff")
                log.warning("%s %s", tag, msg)
                await self._call(self.kube.post_event, job, "Warning", C.EV_STORAGE_ERROR, msg)
                raise RetryLater(f"no fence for attempt {create.attempt}")
            manifest = create.manifest
            kopf.adopt(manifest, owner=job)
            try:
                created = await self._call(self.kube.create_pod, ns, manifest)
            except ForeignPod as e:
                # The status names the pod (intent) without a uid: the next pass finds the
                # foreign pod, and decide reports it as a condition instead of retrying.
                log.warning("%s %s", tag, e)
                return 0.5
            except ApiException as e:
                msg = (f"cannot create pod {create.name} for phase {create.phase}: "
                       f"{e.status} {e.reason}: {_api_message(e)}")
                log.warning("%s %s", tag, msg)
                await self._call(self.kube.post_event, job, "Warning", "PodCreateFailed", msg)
                # Status says "not created yet": a later pass retries, backing off.
                raise RetryLater(f"pod {create.name} refused ({e.status})") from e
            if created:
                uids[create.name] = created
                prometheus.PODS_CREATED.labels(ns).inc()
                if create.previous_end is not None:
                    prometheus.REPLACEMENT_SECONDS.labels(create.previous_cause or "unknown").observe(
                        max(0.0, (self.clock() - create.previous_end).total_seconds()))
            log.info("%s phase=%s %s pod %s (attempt %d) resume_from=%s", tag, create.phase,
                     "created" if created else "found existing", create.name, create.attempt,
                     create.resume_from or "-")
        if uids:
            # Record "created" right away: from now on a missing pod means it was deleted.
            for phase in plan.status.get("phases") or ():
                if phase.get("pod") in uids:
                    phase["podUID"] = uids[phase["pod"]]
                standby = phase.get("standby") or {}
                if standby.get("pod") in uids:
                    standby["podUID"] = uids[standby["pod"]]
            try:
                await self._call(self.kube.patch_status, written, plan.status)
            except ApiException as e:
                if e.status != 409:
                    raise
                # someone changed the job meanwhile; the next pass records the uid from the pod
        for delete in (d for d in plan.delete if not d.force):
            log.info("%s deleting pod %s (%s)", tag, delete.name, delete.reason)
            await self._call(self.kube.delete_pod, ns, delete.name, delete.grace_seconds)
        if not status_written and plan.status != (job.get("status") or {}):
            await self._call(self.kube.patch_status, job, plan.status)
        for note in plan.events:
            log.info("%s %s: %s", tag, note.reason, note.message)
            await self._call(self.kube.post_event, job, note.type, note.reason, note.message)
        for r in plan.recoveries:
            prometheus.count_recovery(ns, name, r.phase, r.cause, r.reason)
        self._observe(job, plan)
        return plan.requeue_after

    def _observe(self, job: dict, plan: Plan) -> None:
        meta = job["metadata"]
        key = (meta["namespace"], meta["name"])
        self.known[key] = plan.status.get("phase", "")
        self._update_job_gauge()
        t = parse_ts(plan.status.get("lastCheckpointTime"))
        prometheus.set_checkpoint_time(*key, plan.status.get("currentPhase"),
                                    t.timestamp() if t else None)

    def _update_job_gauge(self) -> None:
        counts: dict[str, int] = {}
        for phase in self.known.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase in ("Pending", "Running", "Recovering", "Succeeded", "Failed", "Suspended"):
            prometheus.JOBS.labels(phase).set(counts.get(phase, 0))


def _api_message(e: ApiException) -> str:
    import json

    try:
        return json.loads(e.body).get("message", "")[:300]
    except (TypeError, ValueError, AttributeError):
        return str(e.body)[:300]
