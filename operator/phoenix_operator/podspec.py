"""Build a trainer pod manifest from the job spec. Pure: no API calls.

Owner references are added where the pod is created (``kopf.adopt``), so this module only
decides names, labels, env and the pod spec. Secret values never appear here: credentials
reach the trainer through ``secretKeyRef``.

A gang phase (``replicas`` > 1) gets one pod per member, each a torchrun node: a stable
hostname ``<phase>-<member>`` under a headless Service (``gang_service``), and the PET_*
environment torchrun reads (node count, node rank, master address and port, processes per
node), so the trainer's command is plain ``torchrun train.py``. A standby gang runs beside
the active one under the same Service, so its members are named ``<phase>-<attempt>-<member>``
instead: two pods with the same hostname and subdomain resolve to both addresses, and
torchrun's rendezvous would reach the wrong gang's master.

A standby pod (``standby=True``) is the same trainer started ahead of need: ``PHOENIX_ROLE``
tells it to wait until the fence names its attempt; it serves its readiness on
``STATUS_PORT`` (a readiness probe is added unless the template has one); it is kept off the
nodes the caller names (``avoid_nodes``, a required node affinity on ``metadata.name``) and
prefers others (``prefer_not``); and it carries no resume target: the fence names one at
promotion. (Which nodes: ``decide.standby.create_standby``.) An in-place gang's spare member
(``spare=True``, ``spare_pod_name``) is a standby of one pod: the gang's environment without
a member index (``PHOENIX_ROLE=spare``), a hostname of its own (``spare_hostname``) under the
gang's Service, and the peer directory; it takes whichever member's place a fence names it
for (``decide.members``). In a phase that keeps a standby
(``recovery.standby``) the active pods serve and probe their readiness the same way: Ready once
the trainer has restored and trains, which is when the operator starts the standby (it never
competes with the attempt's own start for the CPU, the network or the checkpoint's bytes).

Trainer pods get no ServiceAccount token unless the template asks for one
(``automountServiceAccountToken``): the trainer never talks to the API server, and a token
is one more secret in a pod running user code (and one less request before the container
starts).
"""
from __future__ import annotations

import copy
import hashlib
from typing import Any, Mapping, Sequence

from phoenix_trainer.core import contract as env
from phoenix_trainer.core.heartbeat import ENV_HANG_DETECTION, ENV_HANG_TIMEOUT_SECONDS

from . import constants as C
from .outcomes import trainer_container_name
from .phoenixjob import CABundle, JobSpec, PhaseSpec


def pod_name(job: str, phase: str, attempt: int, member: int | None = None) -> str:
    """``<job>.<phase>-<attempt>``, and ``<job>.<phase>-<attempt>.<member>`` for a gang's
    members. Deterministic: a second reconcile of the same decision creates the same name,
    so the API server's AlreadyExists is our idempotency key.

    Collision-proof: a phase name is a DNS label (no dot) and the attempt a number, so the
    last dot splits off the job and the last dash the attempt; a member index is the only
    part after the last dot that is all digits. Two different (job, phase, attempt, member)
    never share a name. (``<job>-<phase>-<attempt>`` did: job ``a-b`` phase ``c`` and job
    ``a`` phase ``b-c``.)"""
    base = f"{job}.{phase}-{attempt}"
    return base if member is None else f"{base}.{member}"


def spare_pod_name(job: str, phase: str, attempt: int) -> str:
    """``<job>.<phase>-<attempt>.spare``: an in-place gang's spare member, started for the
    reserved ``attempt``. No other pod name ends in ``.spare`` (a member's ends in digits)."""
    return f"{pod_name(job, phase, attempt)}.{C.SPARE}"


def spare_hostname(phase: str, attempt: int) -> str:
    """A spare's hostname under the gang's Service: ``<phase>-<attempt>-spare`` (it is not
    any member's yet; the store host names it if its member ever hosts the store)."""
    suffix = f"-{attempt}-{C.SPARE}"
    return f"{phase[:63 - len(suffix)]}{suffix}"


def member_of(pod: Mapping[str, Any]) -> int:
    """A gang member's index, from the label ``build_pod`` puts on it (0 when absent)."""
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(C.LABEL_MEMBER, 0))
    except ValueError:
        return 0


def gang_service(job: str, phase: str) -> str:
    """The headless Service of a gang phase: a DNS-1035 label, unique per (job, phase) (the
    hash keeps job ``a-b`` phase ``c`` apart from job ``a`` phase ``b-c``)."""
    raw = f"{job}-{phase}".replace(".", "-").lower()
    digest = hashlib.sha256(f"{job}/{phase}".encode()).hexdigest()[:8]
    return f"{'' if raw[:1].isalpha() else 'g-'}{raw[:52].rstrip('-')}-{digest}"


def member_hostname(phase: str, member: int, attempt: int | None = None) -> str:
    """``<phase>-<member>``; ``<phase>-<attempt>-<member>`` for a standby gang's members
    (``attempt`` given), which share the Service with the active gang's. The phase is cut,
    never the numbers, to fit a DNS label."""
    suffix = f"-{member}" if attempt is None else f"-{attempt}-{member}"
    return f"{phase[:63 - len(suffix)]}{suffix}"


def build_service(*, job: str, namespace: str, phase: str) -> dict[str, Any]:
    """Headless, publishing not-ready addresses: members resolve each other by hostname
    while torchrun's rendezvous is still waiting for the gang to gather."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": gang_service(job, phase), "namespace": namespace,
                     "labels": {C.LABEL_JOB: job, C.LABEL_PHASE: phase,
                                C.LABEL_MANAGED_BY: C.MANAGED_BY}},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {C.LABEL_JOB: job, C.LABEL_PHASE: phase, C.LABEL_ROLE: C.ROLE_TRAINER},
                 "ports": [{"name": "rendezvous", "port": C.RENDEZVOUS_PORT}]},
    }


def _gpus(container: Mapping[str, Any]) -> int | None:
    limits = (container.get("resources") or {}).get("limits") or {}
    try:
        return int(limits.get("nvidia.com/gpu")) if limits.get("nvidia.com/gpu") else None
    except (TypeError, ValueError):
        return None


def gang_env(*, job: str, namespace: str, phase: PhaseSpec, member: int | None,
             container: Mapping[str, Any], attempt: int | None = None,
             in_place: bool = False, gang_attempt: int = 0,
             store_member: int = 0, store_host: str | None = None) -> list[dict[str, Any]]:
    """``attempt``: a standby gang's (its hostnames carry it; ``member_hostname``).
    ``in_place`` (``recovery.gangRestart: Member``): torchrun runs standalone in the pod and
    the global group is Phoenix's, on the TCPStore of ``gang_attempt`` hosted by
    ``store_member`` (``gang_store``; ``store_host``: that member's hostname when a former
    spare serves it). ``member`` None: a spare, which learns its member, attempt and store
    from the fence that names it."""
    nproc = phase.nproc_per_node or _gpus(container) or 1
    if in_place and member is None:
        return [{"name": k, "value": v} for k, v in (
            ("PET_STANDALONE", "1"), ("PET_NNODES", "1"), ("PET_NPROC_PER_NODE", str(nproc)),
            (env.ENV_GANG_RESTART, env.GANG_RESTART_MEMBER),
            (env.ENV_GANG_MEMBERS, str(phase.replicas)), (env.ENV_PEER_DIR, env.PEER_DIR))]
    assert member is not None
    if in_place:
        return [{"name": k, "value": v} for k, v in (
            ("PET_STANDALONE", "1"), ("PET_NNODES", "1"), ("PET_NPROC_PER_NODE", str(nproc)),
            (env.ENV_GANG_RESTART, env.GANG_RESTART_MEMBER),
            (env.ENV_GANG_MEMBERS, str(phase.replicas)), (env.ENV_GANG_MEMBER, str(member)),
            (env.ENV_GANG_STORE, gang_store(job, namespace, phase.name, store_member, gang_attempt,
                                            store_host)),
            (env.ENV_GANG_STORE_MEMBER, str(store_member)), (env.ENV_PEER_DIR, env.PEER_DIR))]
    master = (f"{member_hostname(phase.name, 0, attempt)}.{gang_service(job, phase.name)}"
              f".{namespace}.svc")
    return [{"name": k, "value": v} for k, v in (
        ("PET_NNODES", str(phase.replicas)), ("PET_NODE_RANK", str(member)),
        ("PET_MASTER_ADDR", master), ("PET_MASTER_PORT", str(C.RENDEZVOUS_PORT)),
        ("PET_NPROC_PER_NODE", str(nproc)))]


def gang_store(job: str, namespace: str, phase: str, store_member: int, attempt: int,
               hostname: str | None = None) -> str:
    """``host:port`` of an in-place gang's TCPStore for ``attempt``: the stable hostname of
    the member whose local rank 0 hosts it (``hostname``: the pod's own, when a former spare
    serves that member), and a port of the attempt's own (a survivor that re-executes for
    the next attempt never races its old listener for the port)."""
    host = (f"{hostname or member_hostname(phase, store_member)}.{gang_service(job, phase)}"
            f".{namespace}.svc")
    return f"{host}:{C.RENDEZVOUS_PORT + attempt % C.GANG_STORE_PORTS}"


def in_place_gang(spec: JobSpec, phase: PhaseSpec) -> bool:
    """A gang whose lost members are replaced alone (``recovery.gangRestart: Member``)."""
    return phase.replicas > 1 and spec.recovery.gang_restart == env.GANG_RESTART_MEMBER


def mount_peer_dir(pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    """A memory-backed emptyDir at ``PEER_DIR``: the ranks keep their newest step's state
    there, so a survivor's process that re-executes to rejoin still has it (it counts against
    the pod's memory)."""
    volumes = pod_spec.setdefault("volumes", [])
    if not any(v.get("name") == C.PEER_VOLUME for v in volumes):
        volumes.append({"name": C.PEER_VOLUME, "emptyDir": {"medium": "Memory"}})
    mounts = container.setdefault("volumeMounts", [])
    if not any(m.get("name") == C.PEER_VOLUME for m in mounts):
        mounts.append({"name": C.PEER_VOLUME, "mountPath": env.PEER_DIR})


def pod_hostname(name: str) -> str:
    """A DNS label for the pod's hostname (no dots, at most 63 characters); it need not be
    unique, the pod name is."""
    return name.replace(".", "-")[:63].rstrip("-")


def pod_labels(job: str, phase: str, attempt: int, member: int | None = None,
               standby: bool = False, spare: bool = False) -> dict[str, str]:
    labels = {C.LABEL_JOB: job, C.LABEL_PHASE: phase, C.LABEL_ATTEMPT: str(attempt),
              C.LABEL_ROLE: C.ROLE_TRAINER, C.LABEL_MANAGED_BY: C.MANAGED_BY}
    if member is not None:
        labels[C.LABEL_MEMBER] = str(member)
    if standby or spare:
        labels[C.LABEL_STANDBY] = "true"
    if spare:
        labels[C.LABEL_SPARE] = "true"
    return labels


def avoid_nodes(pod_spec: dict[str, Any], nodes: Sequence[str],
                prefer_not: Sequence[str] = ()) -> None:
    """Add "not on ``nodes``" to every required node selector term (terms are ORed, the
    expressions of a term ANDed), keeping whatever the template asks for; and a preference
    against ``prefer_not`` (nodes that announced their reclaim: their NoSchedule taint keeps
    pods off while it lasts, and a fresh node may come back under the same name)."""
    def rule(names: Sequence[str]) -> list[dict[str, Any]]:
        # One expression per node: the API server allows a single value in a matchFields
        # requirement on metadata.name; the expressions of a term are ANDed.
        return [{"key": "metadata.name", "operator": "NotIn", "values": [n]}
                for n in sorted(set(names))]

    if not nodes and not prefer_not:
        return
    affinity = pod_spec.setdefault("affinity", {}).setdefault("nodeAffinity", {})
    if nodes:
        required = affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
        terms = required.setdefault("nodeSelectorTerms", [])
        if not terms:
            terms.append({})
        for term in terms:
            term.setdefault("matchFields", []).extend(rule(nodes))
    if prefer_not:
        affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(
            {"weight": 100, "preference": {"matchFields": rule(prefer_not)}})


def ca_bundle_path(ca_bundle: CABundle) -> str:
    """Where the trainer finds ``spec.checkpoint.caBundle``'s key (``AWS_CA_BUNDLE``)."""
    return f"{C.CA_BUNDLE_DIR}/{ca_bundle.key}"


def mount_ca_bundle(pod_spec: dict[str, Any], container: dict[str, Any],
                    ca_bundle: CABundle) -> None:
    """The ConfigMap's or Secret's key, read-only, at ``ca_bundle_path`` in the trainer
    container only (boto3 reads ``AWS_CA_BUNDLE``; the other containers keep their own
    trust)."""
    items = [{"key": ca_bundle.key, "path": ca_bundle.key}]
    source = ({"secret": {"secretName": ca_bundle.name, "items": items}}
              if ca_bundle.source == "secret"
              else {"configMap": {"name": ca_bundle.name, "items": items}})
    volumes = [v for v in pod_spec.get("volumes") or [] if v.get("name") != C.CA_BUNDLE_VOLUME]
    volumes.append({"name": C.CA_BUNDLE_VOLUME, **source})
    pod_spec["volumes"] = volumes
    mounts = [m for m in container.get("volumeMounts") or []
              if m.get("name") != C.CA_BUNDLE_VOLUME]
    mounts.append({"name": C.CA_BUNDLE_VOLUME, "mountPath": C.CA_BUNDLE_DIR, "readOnly": True})
    container["volumeMounts"] = mounts


def phoenix_env(*, job: str, namespace: str, spec: JobSpec, phase: PhaseSpec, attempt: int,
                resume_from: str | None, init_from: str | None,
                job_uid: str = "") -> list[dict[str, Any]]:
    ck, rec = spec.checkpoint, spec.recovery
    values: list[tuple[str, str | None]] = [
        (env.ENV_JOB_NAME, job), (env.ENV_JOB_NAMESPACE, namespace),
        (env.ENV_JOB_UID, job_uid or None),
        (env.ENV_PHASE, phase.name), (env.ENV_ATTEMPT, str(attempt)),
        (env.ENV_CHECKPOINT_URI, ck.phase_uri(phase.name)),
        (env.ENV_RESUME_FROM, resume_from), (env.ENV_INIT_FROM, init_from),
        (env.ENV_CHECKPOINT_KEEP, str(ck.keep)),
        (env.ENV_CHECKPOINT_INTERVAL_STEPS,
         str(ck.interval_steps) if ck.interval_steps else None),
        (env.ENV_CHECKPOINT_INTERVAL_SECONDS,
         str(ck.interval_seconds) if ck.interval_seconds else None),
        (env.ENV_GRACE_SECONDS, str(rec.grace_seconds)),
        # hang detection (core.heartbeat): the trainer dumps its stacks at the same timeout
        (ENV_HANG_TIMEOUT_SECONDS, f"{rec.hang_timeout:g}" if rec.hang_timeout else None),
        (ENV_HANG_DETECTION, None if rec.hang_detection else "false"),
        (env.ENV_AWS_ENDPOINT_URL, ck.endpoint),
        (env.ENV_AWS_DEFAULT_REGION, ck.region or ("us-east-1" if ck.uri.startswith("s3://")
                                                   else None)),
    ]
    if ck.uri.startswith("s3://") and ck.addressing_style != env.ADDRESSING_AUTO:
        # as the job asked; the trainer resolves it against its endpoint with the same
        # function the operator uses (contract.s3_addressing_style). Unset means auto.
        values.append((env.ENV_S3_ADDRESSING_STYLE, ck.addressing_style))
    if ck.ca_bundle:
        values.append((env.ENV_AWS_CA_BUNDLE, ca_bundle_path(ck.ca_bundle)))
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in values if v is not None]
    if ck.credentials_secret:
        for key in (env.ENV_AWS_ACCESS_KEY_ID, env.ENV_AWS_SECRET_ACCESS_KEY):
            out.append({"name": key, "valueFrom": {"secretKeyRef": {
                "name": ck.credentials_secret, "key": key}}})
        # temporary credentials carry a token; a Secret without one still starts the pod
        out.append({"name": env.ENV_AWS_SESSION_TOKEN, "valueFrom": {"secretKeyRef": {
            "name": ck.credentials_secret, "key": env.ENV_AWS_SESSION_TOKEN,
            "optional": True}}})
    return out


def _merge_env(*layers: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Later layers win by name; order of first appearance is kept (stable diffs)."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for item in layer:
            merged.pop(item["name"], None)
            merged[item["name"]] = dict(item)
    return list(merged.values())


def build_pod(*, job: str, namespace: str, spec: JobSpec, phase: PhaseSpec, attempt: int,
              resume_from: str | None, resume_step: int | None,
              init_from: str | None, member: int | None = None, standby: bool = False,
              avoid: Sequence[str] = (), prefer_not: Sequence[str] = (),
              job_uid: str = "", store_member: int = 0, store_host: str | None = None,
              spare: bool = False) -> dict[str, Any]:
    """One trainer pod; ``member``: its index in a gang phase (None for a single pod);
    ``standby``: started ahead of need, kept off the nodes in ``avoid`` and, if it can be,
    ``prefer_not`` (module docstring); ``spare``: an in-place gang's spare member (no
    ``member``; kept off ``avoid`` the same way)."""
    standby = standby or spare
    template = copy.deepcopy(dict(spec.template))
    meta = template.get("metadata") or {}
    pod_spec = template.get("spec") or {}
    labels = {**(meta.get("labels") or {}),
              **pod_labels(job, phase.name, attempt, member, standby, spare)}
    annotations = dict(meta.get("annotations") or {})
    if resume_from:
        annotations[C.ANNOTATION_RESUME_FROM] = resume_from
        annotations[C.ANNOTATION_RESUME_STEP] = str(resume_step)
    name = spare_pod_name(job, phase.name, attempt) if spare else \
        pod_name(job, phase.name, attempt, member)
    avoid_nodes(pod_spec, avoid, prefer_not)
    pod_spec["restartPolicy"] = "Never"
    pod_spec["terminationGracePeriodSeconds"] = spec.recovery.grace_seconds
    pod_spec.setdefault("automountServiceAccountToken", False)
    if spare:
        pod_spec["hostname"] = spare_hostname(phase.name, attempt)
        pod_spec["subdomain"] = gang_service(job, phase.name)
    elif member is None:
        pod_spec.setdefault("hostname", pod_hostname(name))
    else:  # stable across attempts, except a standby gang's (beside the active gang)
        pod_spec["hostname"] = member_hostname(phase.name, member, attempt if standby else None)
        pod_spec["subdomain"] = gang_service(job, phase.name)
    probe = {"metadata": {"annotations": annotations}, "spec": pod_spec}
    trainer = trainer_container_name(probe)
    ours = phoenix_env(job=job, namespace=namespace, spec=spec, phase=phase, attempt=attempt,
                       job_uid=job_uid,
                       resume_from=resume_from, init_from=init_from)
    for container in pod_spec.get("containers") or []:
        if container.get("name") != trainer:
            continue
        if phase.args is not None:
            container["args"] = list(phase.args)
        in_place = in_place_gang(spec, phase) and (spare or not standby)
        gang = [] if member is None and not spare else gang_env(
            job=job, namespace=namespace, phase=phase, member=member, container=container,
            attempt=attempt if standby and not spare else None, in_place=in_place,
            gang_attempt=attempt, store_member=store_member, store_host=store_host)
        if in_place and (member is not None or spare):
            mount_peer_dir(pod_spec, container)
        probed = standby or spec.recovery.standby
        role = [{"name": env.ENV_ROLE,
                 "value": env.ROLE_SPARE if spare else env.ROLE_STANDBY}] if standby else []
        # the pod's own name, for its heartbeats (a hostname is not always the pod's name)
        role.append({"name": env.ENV_POD_NAME, "valueFrom": {
            "fieldRef": {"fieldPath": "metadata.name"}}})
        if "ephemeral-storage" in ((container.get("resources") or {}).get("limits") or {}):
            # the spool's default limit (the trainer's spool_limit_bytes): under the limit
            # the kubelet evicts at, which would look like a preemption and repeat
            role.append({"name": env.ENV_EPHEMERAL_STORAGE_MB, "valueFrom": {
                "resourceFieldRef": {"containerName": trainer,
                                     "resource": "limits.ephemeral-storage", "divisor": "1M"}}})
        if probed:
            role.append({"name": env.ENV_STATUS_PORT, "value": str(C.STATUS_PORT)})
        container["env"] = _merge_env(container.get("env") or [], list(phase.env), ours, gang,
                                      role)
        container.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
        if spec.checkpoint.ca_bundle:
            mount_ca_bundle(pod_spec, container, spec.checkpoint.ca_bundle)
        if probed:
            # Ready within a second of restoring; NotReady only after three probes in a row
            # fail (about 3 s): the answering thread needs the GIL, which a standby loading a
            # large checkpoint (or a step in Python) can hold for longer than one probe's
            # timeout, and a flicker would hold back a handoff. A pod that ends is seen by
            # its end, not by its probe. The first probe waits out the interpreter's start
            # (importing torch: the runtime's server listens only once the script builds its
            # Session): probed before that, every pod left "Unhealthy" warnings, and a script
            # that ends within seconds (an evaluation) was never probed successfully at all.
            container.setdefault("readinessProbe", {
                "httpGet": {"path": "/ready", "port": C.STATUS_PORT},
                "initialDelaySeconds": C.STATUS_PROBE_DELAY_SECONDS,
                "periodSeconds": 1, "failureThreshold": 3, "successThreshold": 1,
                "timeoutSeconds": 1})
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "annotations": annotations},
        "spec": pod_spec,
    }
