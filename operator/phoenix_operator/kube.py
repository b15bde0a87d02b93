"""Blocking Kubernetes API calls the operator makes, in one place (run them in threads).

Objects go in and out as plain dicts in the API's JSON shape, the same shape ``decide``
and kopf bodies use. Nothing here decides anything.
"""
from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from phoenix_trainer.core import contract
from phoenix_trainer.core.storage import Credentials

from . import constants as C

log = logging.getLogger("phoenix.kube")


def _json_or_none(read, *args) -> dict | None:
    """A read as raw JSON (no typed models: building them costs more than the call), or None
    for 404."""
    try:
        resp = read(*args, _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return json.loads(resp.data)


class EventCache:
    """The Events this process posted, by (namespace, object, type, reason, message): name
    and count, so a repeat updates the Event instead of creating another. Bounded (oldest
    forgotten first); thread-safe (events are posted from the API worker threads)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._items: OrderedDict[tuple, tuple[str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[str, int] | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: tuple, name: str, count: int) -> None:
        with self._lock:
            self._items[key] = (name, count)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class ForeignPod(Exception):
    """A pod the operator wants to create exists and belongs to someone else."""

    def __init__(self, namespace: str, name: str, owner: str) -> None:
        super().__init__(f"pod {namespace}/{name} exists and is not ours ({owner})")
        self.namespace, self.name, self.owner = namespace, name, owner


def describe_owner(pod: dict) -> str:
    """Who a pod belongs to, for a person: its controller, else its first owner, else none."""
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if ref is None:
        return "it has no owner"
    return f"owned by {ref.get('kind')} {ref.get('name')} (uid {ref.get('uid')})"


def load_config(pool_size: int | None = None) -> None:
    """In-cluster config, else the kubeconfig. ``pool_size``: HTTP connections kept per host,
    at least one per API worker thread (the client's default, 5 per CPU, is fewer than the
    16 workers on a 2-CPU node: busy passes then open a new TLS connection per call and throw
    it away, "Connection pool is full, discarding connection")."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    if pool_size:
        c = client.Configuration.get_default_copy()
        c.connection_pool_maxsize = max(c.connection_pool_maxsize or 0, pool_size)
        client.Configuration.set_default(c)


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None,
                 user_agent: str | None = None) -> None:
        """``user_agent``: names this replica in the API server's audit log (which replica
        wrote what, e.g. ``phoenix-operator/<pod>``)."""
        self.api = api_client or client.ApiClient()
        if user_agent:
            self.api.user_agent = user_agent
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.leases = client.CoordinationV1Api(self.api)
        self.events = EventCache()

    def _plain(self, obj: Any) -> Any:
        return self.api.sanitize_for_serialization(obj)

    # --- PhoenixJobs -------------------------------------------------------------------
    def get_job(self, namespace: str, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(
                C.GROUP, C.VERSION, namespace, C.PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_jobs(self, namespace: str | None = None) -> list[dict]:
        if namespace:
            out = self.custom.list_namespaced_custom_object(C.GROUP, C.VERSION, namespace,
                                                            C.PLURAL)
        else:
            out = self.custom.list_cluster_custom_object(C.GROUP, C.VERSION, C.PLURAL)
        return out.get("items", [])

    def patch_status(self, job: dict, status: dict) -> dict:
        """Merge-patch the status subresource, guarded by the resourceVersion we decided on
        (a concurrent spec change makes this fail with 409 and we decide again)."""
        meta = job["metadata"]
        body = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        return self.custom.patch_namespaced_custom_object_status(
            C.GROUP, C.VERSION, meta["namespace"], C.PLURAL, meta["name"], body)

    # --- pods --------------------------------------------------------------------------
    def list_pods(self, namespace: str, job: str) -> list[dict]:
        # Raw JSON: building typed models and converting them back costs more than the call.
        resp = self.core.list_namespaced_pod(namespace, label_selector=f"{C.LABEL_JOB}={job}",
                                             _preload_content=False)
        return json.loads(resp.data).get("items") or []

    def list_pulled_events(self, namespace: str, pod_uid: str) -> list[dict]:
        """The kubelet's ``Pulled`` events on one pod (a field selector: one small LIST)."""
        resp = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.uid={pod_uid},reason=Pulled",
            _preload_content=False)
        return json.loads(resp.data).get("items") or []

    def create_pod(self, namespace: str, manifest: dict) -> str | None:
        """Create; returns the new pod's uid. If a pod of that name already exists (409, the
        idempotency key) it is ours only when its owner reference names the same owner as
        ``manifest``'s: then its uid comes back; otherwise ``ForeignPod`` is raised. None:
        it existed but was gone again before it could be read."""
        try:
            # Raw JSON: the uid is all we read, and typed models of a whole pod cost
            # milliseconds of CPU on the path to every pod's start.
            resp = self.core.create_namespaced_pod(namespace, manifest, _preload_content=False)
            return json.loads(resp.data)["metadata"]["uid"]
        except ApiException as e:
            if e.status != 409:
                raise
        name = manifest["metadata"]["name"]
        existing = self.get_pod(namespace, name)
        if existing is None:
            return None
        meta = existing.get("metadata") or {}
        owners = {r.get("uid") for r in (manifest["metadata"].get("ownerReferences") or ())}
        if any(r.get("uid") in owners for r in meta.get("ownerReferences") or ()):
            return meta.get("uid")
        raise ForeignPod(namespace, name, describe_owner(existing))

    def ensure_service(self, namespace: str, manifest: dict) -> None:
        """Create the gang's headless Service; one that exists already is fine (its selector
        and ports are a function of the name)."""
        try:
            self.core.create_namespaced_service(namespace, manifest)
        except ApiException as e:
            if e.status != 409:
                raise

    def get_pod(self, namespace: str, name: str) -> dict | None:
        """The pod as JSON, or None if it does not exist (404)."""
        return _json_or_none(self.core.read_namespaced_pod, name, namespace)

    def delete_pod(self, namespace: str, name: str, grace_seconds: int) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace_seconds)
        except ApiException as e:
            if e.status != 404:
                raise

    # --- nodes (read only: is the node a live pod is bound to still there?) ------------
    def get_node(self, name: str) -> dict | None:
        """The Node as JSON, or None if it does not exist (404)."""
        return _json_or_none(self.core.read_node, name)

    # --- secrets (only the credential keys are ever decoded) ----------------------------
    def s3_credentials(self, namespace: str, name: str) -> Credentials:
        """The job's keys from its credentialsSecret: the access key pair and, for temporary
        credentials, ``AWS_SESSION_TOKEN`` (optional). Only the keys; the caller adds where
        to reach storage. ``Credentials`` never prints them."""
        secret = self.core.read_namespaced_secret(name, namespace)
        data = secret.data or {}

        def get(key: str) -> str | None:
            raw = data.get(key)
            return base64.b64decode(raw).decode() if raw else None

        return Credentials(access_key=get(contract.ENV_AWS_ACCESS_KEY_ID),
                           secret_key=get(contract.ENV_AWS_SECRET_ACCESS_KEY),
                           session_token=get(contract.ENV_AWS_SESSION_TOKEN))

    # --- the operator's leader Lease (leader.py decides; these only talk) ---------------
    def get_lease(self, namespace: str, name: str) -> dict | None:
        return _json_or_none(self.leases.read_namespaced_lease, name, namespace)

    def create_lease(self, namespace: str, name: str, spec: dict) -> dict:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {C.LABEL_MANAGED_BY: C.MANAGED_BY,
                                        C.LABEL_OPERATOR_LEASE: "true"}},
                "spec": spec}
        resp = self.leases.create_namespaced_lease(namespace, body, _preload_content=False)
        return json.loads(resp.data)

    def replace_lease(self, lease: dict, spec: dict, resource_version: str) -> dict:
        """Replace ``lease``'s spec, guarded by ``resource_version`` (409 if it moved)."""
        meta = lease["metadata"]
        body = dict(lease, spec=spec, metadata=dict(meta, resourceVersion=resource_version))
        resp = self.leases.replace_namespaced_lease(meta["name"], meta["namespace"], body,
                                                    _preload_content=False)
        return json.loads(resp.data)

    def operator_leases(self) -> list[dict]:
        """Every operator leader Lease in the cluster (label ``C.LABEL_OPERATOR_LEASE``)."""
        resp = self.leases.list_lease_for_all_namespaces(
            label_selector=f"{C.LABEL_OPERATOR_LEASE}=true", _preload_content=False)
        return json.loads(resp.data).get("items") or []

    # --- events ------------------------------------------------------------------------
    def post_event(self, job: dict, type_: str, reason: str, message: str,
                   component: str = C.MANAGED_BY) -> None:
        """Post an Event on the job (or any object with its apiVersion and kind: the leader
        Lease); the same event again (object, type, reason, message)
        bumps the first one's count and lastTimestamp, as kubectl describe shows
        "(x5 over 2m)", instead of another object every retry."""
        meta = job["metadata"]
        now = datetime.now(timezone.utc)
        key = (meta["namespace"], meta.get("uid") or meta["name"], type_, reason, message[:1024])
        seen = self.events.get(key)
        if seen is not None:
            name, count = seen
            try:
                self.core.patch_namespaced_event(name, meta["namespace"], {
                    "count": count + 1, "lastTimestamp": now.isoformat()})
                self.events.put(key, name, count + 1)
                return
            except ApiException as e:  # gone (events expire after an hour): post anew
                if e.status != 404:
                    log.warning("could not update event %s on %s/%s: %s", reason,
                                meta["namespace"], meta["name"], e.reason)
                    return
        event = {
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}",
                         "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": job.get("apiVersion") or C.API_VERSION,
                               "kind": job.get("kind") or C.KIND,
                               "name": meta["name"], "namespace": meta["namespace"],
                               "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message[:1024], "type": type_,
            "source": {"component": component},
            "reportingComponent": f"{C.GROUP}/operator", "reportingInstance": component,
            "firstTimestamp": now.isoformat(), "lastTimestamp": now.isoformat(), "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], event)
            self.events.put(key, event["metadata"]["name"], 1)
        except ApiException as e:  # events are best effort; never fail a reconcile on them
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"],
                        meta["name"], e.reason)
