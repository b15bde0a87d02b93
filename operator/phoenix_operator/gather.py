"""Gather one job's facts for ``decide``, as one typed snapshot (``Facts``).

Everything comes from the API on each pass (the job by GET, its pods by label LIST, the
nodes of its live pods, foreign pods holding names its status wants) plus the tombstones of
pods the watch saw deleted (``Tombstones``): nothing in memory is needed to be correct after
a restart. The job's spec is parsed once here and handed on. Storage is read through one
door: ``listings`` (``phase_storage.scan``, in a thread) and ``progress`` (the running
attempts' heartbeats, ``phase_storage.read_heartbeats``), with the credentials ``storage_access``
finds (invariant 4: the job's own, or the operator's only where allowed). Image pulls: the
kubelet's ``Pulled`` events of a pod that just started, by field selector (``image_pull``).
Never writes.

Node facts: for every live pod bound to a node, the node is read (GET, one per node per
pass) and its health handed to ``decide``; the node watch in ``main`` only makes the pass
happen promptly (``Reconciler.poke_node``).
"""
from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Mapping

from kubernetes.client.rest import ApiException
from phoenix_trainer.core.contract import (ENV_AWS_ACCESS_KEY_ID, ENV_AWS_SECRET_ACCESS_KEY,
                                           s3_addressing_style)
from phoenix_trainer.core.heartbeat import Heartbeat
from phoenix_trainer.core.storage import Credentials

from . import image_pull
from .config import OperatorConfig
from .constants import DELETED_KEY, LABEL_ATTEMPT, LABEL_PHASE, PhaseState
from .decide import Listing, PhaseProgress, RankProgress
from .decide.plan import is_spare_pod
from .podspec import member_of
from .kube import Kube, describe_owner
from .node_health import NodeHealth, node_health
from .outcomes import bare_kill
from .phase_storage import read_heartbeats, scan
from .phoenixjob import ImagePull, JobSpec, phase_statuses

log = logging.getLogger("phoenix.reconcile")

Key = tuple[str, str]  # (namespace, name)
Call = Callable[..., Awaitable[Any]]  # runs a blocking function in the API threads


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


class Tombstones:
    """Last state the watch showed of each trainer pod, per job. A pod missing from the
    (authoritative) LIST is gone; its last state keeps the DisruptionTarget condition and exit
    code the vanished pod can no longer show. Only an aid: after a restart it is empty and a
    vanished pod counts as PodDeleted."""

    KEEP = 16  # per job

    def __init__(self) -> None:
        self._seen: dict[Key, dict[str, dict]] = {}

    def remember(self, key: Key, pod: dict) -> None:
        seen = self._seen.setdefault(key, {})
        name = pod["metadata"]["name"]
        seen.pop(name, None)
        seen[name] = pod
        while len(seen) > self.KEEP:
            seen.pop(next(iter(seen)))

    def of(self, key: Key) -> Mapping[str, dict]:
        return self._seen.get(key, {})

    def jobs_on_node(self, node: str) -> list[Key]:
        """Jobs with a pod seen on ``node``."""
        return [key for key, pods in list(self._seen.items())
                if any((p.get("spec") or {}).get("nodeName") == node for p in pods.values())]

    def forget(self, key: Key) -> None:
        self._seen.pop(key, None)


class Heartbeats:
    """The running attempts' heartbeats as last read, and since when each rank's newest one
    has been seen unchanged (the operator's own monotonic clock: no clock agreement with
    the pods). Read at most every ``READ_SECONDS`` per attempt. Only an aid: after a restart
    it is empty, and a stall is measured from the heartbeat's own count again (later, never
    sooner)."""

    READ_SECONDS = 5.0
    # An attempt that wrote no heartbeat yet (starting, or a trainer without a Session): its
    # prefix is listed again only this often (a LIST and the Secret's GET per running job
    # per pass would otherwise follow every resync).
    EMPTY_READ_SECONDS = 30.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._read: dict[tuple, tuple[float, list[Heartbeat], dict[int, str]]] = {}
        self._seen: dict[tuple, tuple[int, float]] = {}  # (attempt key, rank) -> (beat, since)

    def fresh(self, key: tuple) -> tuple[list[Heartbeat], dict[int, str]] | None:
        hit = self._read.get(key)
        ttl = self.READ_SECONDS if hit is not None and hit[1] else self.EMPTY_READ_SECONDS
        if hit is None or self.clock() - hit[0] >= ttl:
            return None
        return hit[1], hit[2]

    def store(self, key: tuple, beats: list[Heartbeat], dumps: dict[int, str]) -> None:
        for old in [k for k in self._read if k[:2] == key[:2] and k != key]:  # older attempts
            self._read.pop(old, None)
            for seen in [s for s in self._seen if s[0] == old]:
                self._seen.pop(seen, None)
        self._read[key] = (self.clock(), beats, dumps)
        for hb in beats:
            seen = self._seen.get((key, hb.rank))
            if seen is None or seen[0] != hb.beat:
                self._seen[(key, hb.rank)] = (hb.beat, self.clock())

    def unchanged_for(self, key: tuple, hb: Heartbeat) -> float:
        seen = self._seen.get((key, hb.rank))
        return max(0.0, self.clock() - seen[1]) if seen and seen[0] == hb.beat else 0.0

    def forget(self, job: Key) -> None:
        for store in (self._read, self._seen):
            for k in [k for k in store if (k[0] if store is self._read else k[0][0]) == job]:
                store.pop(k, None)


def _serves(st: Any, pod: Mapping[str, Any]) -> bool:
    """Whether ``pod`` serves a member of the phase's current attempt (a former spare: the
    member the status says, ``spare_members``; a spare still waiting serves none)."""
    if is_spare_pod(pod):
        return any(_attempt_of(pod) == (st.name, st.member_attempt(m)) for m in st.spare_members)
    return _attempt_of(pod) == (st.name, st.member_attempt(member_of(pod)))


def _attempt_of(pod: Mapping[str, Any]) -> tuple[str, int] | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    try:
        return labels.get(LABEL_PHASE, ""), int(labels.get(LABEL_ATTEMPT, ""))
    except ValueError:
        return None


class StorageAccessError(Exception):
    """The job's checkpoint storage cannot be reached with what the cluster gives us."""


@dataclass(frozen=True)
class Facts:
    """One job as one pass sees it: what ``decide`` is called with."""

    job: dict
    spec: JobSpec  # job["spec"], parsed once per pass
    pods: list[dict]  # owned pods as listed, then tombstones (DELETED_KEY) of vanished ones
    nodes: dict[str, NodeHealth]
    foreign: dict[str, str]
    listings: dict[str, Listing] = field(default_factory=dict)  # empty until asked for


def owned(pod: dict, uid: str | None) -> bool:
    """Pods of an earlier PhoenixJob with the same name (still being garbage collected)
    are not ours."""
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return not uid or any(r.get("uid") == uid for r in refs)


class Gather:
    """Reads through ``kube`` (blocking calls run by ``call`` in the API threads)."""

    def __init__(self, kube: Kube, config: OperatorConfig, call: Call,
                 tombstones: Tombstones) -> None:
        self.kube, self.config, self.call, self.tombstones = kube, config, call, tombstones
        self._node_read_warned = False
        self.heartbeats = Heartbeats()

    async def job(self, namespace: str, name: str) -> dict | None:
        return await self.call(self.kube.get_job, namespace, name)

    async def facts(self, job: dict) -> Facts:
        """Everything but the storage listings (``listings`` adds them when asked)."""
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        uid = job["metadata"].get("uid")
        pods = [p for p in await self.call(self.kube.list_pods, namespace, name)
                if owned(p, uid)]
        present = {p["metadata"]["name"] for p in pods}
        last_seen = self.tombstones.of((namespace, name))
        pods += [{**p, DELETED_KEY: True} for n, p in last_seen.items()
                 if n not in present and owned(p, uid)]
        nodes = await self.nodes(pods)
        foreign = await self.foreign(job, present)
        return Facts(job=job, spec=JobSpec.parse(job.get("spec") or {}), pods=pods, nodes=nodes,
                     foreign=foreign)

    async def image_pulls(self, job: dict, pods: list[dict], now) -> dict[str, ImagePull]:
        """The image pulls of the pods ``image_pull.wanted`` names (a pod that just started
        and whose pull the status does not record yet), by pod name: one events LIST each.
        An unreadable event is only a missing figure, never a failed pass."""
        out: dict[str, ImagePull] = {}
        namespace = job["metadata"]["namespace"]
        for _phase, attempt, pod in image_pull.wanted(job.get("status") or {}, pods, now):
            try:
                events = await self.call(self.kube.list_pulled_events, namespace,
                                         pod["metadata"]["uid"])
            except ApiException as e:
                log.debug("[%s/%s] events of pod %s not readable: %s", namespace,
                          job["metadata"]["name"], pod["metadata"]["name"], e.reason)
                continue
            pull = image_pull.from_events(events, pod, attempt)
            if pull is not None:
                out[pull.pod] = pull
        return out

    async def nodes(self, pods: list[dict]) -> dict[str, NodeHealth]:
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
                out[name] = node_health(await self.call(self.kube.get_node, name),
                                        self.config.notice_taints, self.config.notice_conditions)
            except ApiException as e:
                # Not knowing is not "lost": leave the pod to pod GC, as without this check.
                if not self._node_read_warned:
                    log.warning("cannot read node %s (%s %s); node loss will only be noticed "
                                "through pod GC. Grant get on nodes or set "
                                "PHOENIX_WATCH_NODES=false", name, e.status, e.reason)
                    self._node_read_warned = True
        return out

    async def foreign(self, job: dict, present: set[str]) -> dict[str, str]:
        """Pods the status names but has no uid for (the create is pending or was refused
        with 409), that the LIST of our pods did not return: if they exist they are someone
        else's. One GET each; normally there are none."""
        ns, uid = job["metadata"]["namespace"], job["metadata"].get("uid")
        wanted = [p["pod"] for p in (job.get("status") or {}).get("phases") or ()
                  if p.get("pod") and not p.get("podUID") and p["pod"] not in present]
        out: dict[str, str] = {}
        for name in wanted:
            pod = await self.call(self.kube.get_pod, ns, name)
            if pod is not None and not owned(pod, uid):
                out[name] = describe_owner(pod)
        return out

    async def storage_access(self, job: dict, spec: JobSpec | None = None) -> Credentials:
        """Where and as whom the operator reaches the job's checkpoint storage (the
        ``credentials`` of ``phase_storage.scan``/``write_fence``/``write_control``). Raises
        StorageAccessError saying why not. ``spec``: ``job["spec"]`` already parsed (parsed
        here if not given). The addressing style is resolved against the job's own endpoint,
        so the operator reaches the bucket the way the job's trainer does."""
        spec = spec if spec is not None else JobSpec.parse(job["spec"])
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
        keys = Credentials()  # no keys: boto3's default chain, the operator's own identity
        if name:
            try:
                keys = await self.call(self.kube.s3_credentials, ns, name)
            except ApiException as e:
                raise StorageAccessError(
                    f"cannot read Secret {ns}/{name}: {e.status} {e.reason}") from e
            # Invariant 4 again: a Secret without keys gives boto3 none, and boto3 then
            # takes the operator's own identity from its default chain.
            missing = [key for key, value in ((ENV_AWS_ACCESS_KEY_ID, keys.access_key),
                                              (ENV_AWS_SECRET_ACCESS_KEY, keys.secret_key))
                       if not value]
            if missing:
                raise StorageAccessError(
                    f"credentialsSecret {ns}/{name} has no {', '.join(missing)}: put the job's "
                    "access key pair in it (the operator uses the job's credentials, never its own,"
                    " for a job that names a Secret)")
        ck = spec.checkpoint
        return replace(keys, endpoint_url=self.config.s3_endpoint_override or ck.endpoint,
                       region=ck.region,
                       addressing_style=s3_addressing_style(ck.addressing_style, ck.endpoint))

    async def listings(self, facts: Facts, phases: set[str]) -> Facts:
        """``phase_storage`` with the checkpoint listings of ``phases`` added (the one door to
        storage reads: ``phase_storage.scan``, verified; a listing that failed says why)."""
        job, spec = facts.job, facts.spec
        listings = dict(facts.listings)
        try:
            access = await self.storage_access(job, spec)
        except StorageAccessError as e:
            listings.update({p: Listing(error=str(e)) for p in phases})
            return replace(facts, listings=listings)
        statuses = phase_statuses(spec, job.get("status"))
        results = await asyncio.gather(*(
            self.call(scan, spec, p, credentials=access,
                      skipped=statuses[p].skipped_steps if p in statuses else (),
                      deep=self.config.deep_verify)
            for p in sorted(phases)))
        uid = job["metadata"].get("uid") or ""
        listings.update({p: await self.owner(listing, uid)
                         for p, listing in zip(sorted(phases), results)})
        return replace(facts, listings=listings)

    async def progress(self, facts: Facts) -> dict[str, PhaseProgress]:
        """The heartbeats of every running attempt (``decide.hangs`` judges them), when the
        job watches for hangs; storage trouble is logged and decides nothing."""
        job, spec = facts.job, facts.spec
        if not spec.recovery.hang_detection:
            return {}
        key: Key = (job["metadata"]["namespace"], job["metadata"]["name"])
        running = [st for st in phase_statuses(spec, job.get("status")).values()
                   if st.state == PhaseState.RUNNING and st.pod_uid
                   and not (st.last_hang is not None and st.last_hang.attempt == st.attempts)]
        if not running:
            return {}
        access: Credentials | None = None
        if any(self.heartbeats.fresh((key, st.name, st.attempts)) is None for st in running):
            try:
                access = await self.storage_access(job, spec)
            except StorageAccessError:
                return {}  # the listings say why, when they are needed
        out: dict[str, PhaseProgress] = {}
        for st in running:
            # a heartbeat names its pod by hostname (a gang member's is its spec.hostname)
            pods = {n: p for p in facts.pods
                    if _serves(st, p)
                    for n in ((p.get("metadata") or {}).get("name"),
                              (p.get("spec") or {}).get("hostname")) if n}
            at = (key, st.name, st.attempts)
            got = self.heartbeats.fresh(at)
            if got is None and access is not None:
                try:
                    got = await self.call(read_heartbeats, spec, st.name, st.attempts,
                                          credentials=access)
                except Exception as e:  # noqa: BLE001 - storage trouble: no decision from it
                    log.warning("[%s/%s] cannot read the heartbeats of phase %s: %s", *key,
                                st.name, e)
                    out[st.name] = PhaseProgress(st.attempts, error=str(e)[:300])
                    continue
                self.heartbeats.store(at, *got)
            if got is None:
                continue
            beats, dumps = got
            ranks = []
            for hb in beats:
                quiet = self.heartbeats.unchanged_for(at, hb)
                pod = pods.get(hb.pod) or {}
                ranks.append(RankProgress(
                    rank=hb.rank, pod=(pod.get("metadata") or {}).get("name") or hb.pod,
                    step=hb.step, activity=hb.activity,
                    stalled=hb.stalled + quiet, frozen=quiet > 2 * hb.interval + Heartbeats.READ_SECONDS,
                    step_p50=hb.step_p50, step_p95=hb.step_p95, compute_p50=hb.compute_p50,
                    steps_timed=hb.steps_timed, stack_dump=dumps.get(hb.rank, ""),
                    in_collective=hb.in_collective,
                    node=(pod.get("spec") or {}).get("nodeName") or "",
                    restored_from=hb.restored_from, restored_step=hb.restored_step,
                    training_since=hb.training_since))
            out[st.name] = PhaseProgress(st.attempts, tuple(sorted(ranks, key=lambda r: r.rank)))
        return out

    async def owner(self, listing: Listing, uid: str) -> Listing:
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
                other = await self.call(self.kube.get_job, namespace, name)
                live = other is not None and other["metadata"].get("uid") == fence.uid
            except ApiException as e:
                log.warning("cannot read PhoenixJob %s (%s %s), which holds a checkpoint prefix",
                            fence.job, e.status, e.reason)
        return replace(listing, owner_live=live)
