"""Operator configuration: parsed and validated once, from the environment, at startup.

Nothing else in the operator reads ``os.environ``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

from . import constants as C


class ConfigError(ValueError):
    """An operator environment variable has a value that cannot work."""


@dataclass(frozen=True)
class OperatorConfig:
    metrics_port: int = 8080
    """PHOENIX_METRICS_PORT: Prometheus /metrics port (0 disables)."""
    metrics_host: str = "0.0.0.0"
    """PHOENIX_METRICS_HOST: address the metrics server binds."""
    resync_seconds: float = 60.0
    """PHOENIX_RESYNC_SECONDS: every job is reconciled at least this often, events or not."""
    deep_verify: bool = True
    """PHOENIX_DEEP_VERIFY: check every shard's sha256 before resuming from a checkpoint
    (false: manifest and sizes only; faster for huge checkpoints)."""
    api_workers: int = 16
    """PHOENIX_API_WORKERS: threads for blocking Kubernetes/S3 calls."""
    s3_endpoint_override: str | None = None
    """PHOENIX_S3_ENDPOINT_OVERRIDE: endpoint the *operator* uses to reach storage when it
    differs from the one trainers use (e.g. operator outside the cluster network)."""
    watch_nodes: bool = True
    """PHOENIX_WATCH_NODES: watch and read Nodes, so a trainer pod whose node was deleted or
    stayed NotReady is replaced at once instead of after pod GC (needs get/list/watch on
    nodes; false: rely on pod GC). Preemption notices need it too."""
    notice_taints: tuple[str, ...] = C.DEFAULT_NOTICE_TAINTS
    """PHOENIX_NOTICE_TAINTS: comma-separated node taint keys that announce a reclaim."""
    notice_conditions: tuple[str, ...] = C.DEFAULT_NOTICE_CONDITIONS
    """PHOENIX_NOTICE_CONDITIONS: comma-separated node condition types that announce a
    reclaim while True."""
    own_identity_prefixes: tuple[str, ...] = ()
    """PHOENIX_OWN_IDENTITY_PREFIXES: comma-separated checkpoint URI prefixes (s3://bucket/path/)
    for which a job without credentialsSecret may be served with the operator's own cloud
    identity (workload identity, the AWS default chain). Empty: never - every job brings its
    own credentials, so creating a PhoenixJob cannot borrow the operator's access."""
    leader_election: bool = False
    """PHOENIX_LEADER_ELECTION: run as one of several replicas, writing only while holding the
    Lease ``lease_namespace/lease_name`` (false: a standalone operator, the only one)."""
    lease_name: str = "phoenix-operator"
    """PHOENIX_LEASE_NAME: the leader-election Lease (the operator creates it)."""
    lease_namespace: str = ""
    """PHOENIX_LEASE_NAMESPACE: its namespace (required with leader election)."""
    identity: str = ""
    """PHOENIX_POD_NAME: this replica's name in the Lease (default: the host name)."""
    lease_duration: float = 15.0
    """PHOENIX_LEASE_DURATION_SECONDS: a standby takes over a lease not renewed this long."""
    renew_deadline: float = 10.0
    """PHOENIX_RENEW_DEADLINE_SECONDS: the leader stops writing when it could not renew for
    this long (less than the lease duration: it stops before anyone else may start)."""
    retry_period: float = 2.0
    """PHOENIX_RETRY_PERIOD_SECONDS: how often the leader renews and a standby tries."""
    allow_file_uris: bool = False
    """PHOENIX_ALLOW_FILE_URIS: accept file:// checkpoint URIs (the operator then reads and
    writes its own filesystem at that path: for single-node set-ups and tests only)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "OperatorConfig":
        env = os.environ if environ is None else environ

        def number(name: str, default: float, kind=float, minimum: float = 0):
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError as e:
                raise ConfigError(f"{name}={raw!r} is not a number; unset it or give one") from e
            if value < minimum:
                raise ConfigError(f"{name}={value} is below {minimum}")
            return value

        def names(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
            if name not in env:
                return default
            return tuple(n.strip() for n in env[name].split(",") if n.strip())

        def flag(name: str, default: str) -> bool:
            raw = env.get(name, default).strip().lower() or default
            if raw not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{name}={raw!r}: use true or false")
            return raw in ("true", "1", "yes")

        election = dict(
            leader_election=flag("PHOENIX_LEADER_ELECTION", "false"),
            lease_name=env.get("PHOENIX_LEASE_NAME") or "phoenix-operator",
            lease_namespace=env.get("PHOENIX_LEASE_NAMESPACE", ""),
            identity=env.get("PHOENIX_POD_NAME") or socket.gethostname(),
            lease_duration=number("PHOENIX_LEASE_DURATION_SECONDS", 15.0, float, 1),
            renew_deadline=number("PHOENIX_RENEW_DEADLINE_SECONDS", 10.0, float, 0.1),
            retry_period=number("PHOENIX_RETRY_PERIOD_SECONDS", 2.0, float, 0.05))
        if election["leader_election"]:
            if not election["lease_namespace"]:
                raise ConfigError("PHOENIX_LEADER_ELECTION=true needs PHOENIX_LEASE_NAMESPACE")
            if not (election["retry_period"] < election["renew_deadline"]
                    < election["lease_duration"]):
                raise ConfigError(
                    "leader election needs PHOENIX_RETRY_PERIOD_SECONDS < "
                    "PHOENIX_RENEW_DEADLINE_SECONDS < PHOENIX_LEASE_DURATION_SECONDS, got "
                    f"{election['retry_period']}, {election['renew_deadline']}, "
                    f"{election['lease_duration']}")
        return cls(
            metrics_port=int(number("PHOENIX_METRICS_PORT", 8080, int)),
            metrics_host=env.get("PHOENIX_METRICS_HOST", "0.0.0.0") or "0.0.0.0",
            resync_seconds=number("PHOENIX_RESYNC_SECONDS", 60.0, float, 1),
            deep_verify=flag("PHOENIX_DEEP_VERIFY", "true"),
            api_workers=int(number("PHOENIX_API_WORKERS", 16, int, 1)),
            s3_endpoint_override=env.get("PHOENIX_S3_ENDPOINT_OVERRIDE") or None,
            watch_nodes=flag("PHOENIX_WATCH_NODES", "true"),
            notice_taints=names("PHOENIX_NOTICE_TAINTS", C.DEFAULT_NOTICE_TAINTS),
            notice_conditions=names("PHOENIX_NOTICE_CONDITIONS", C.DEFAULT_NOTICE_CONDITIONS),
            own_identity_prefixes=names("PHOENIX_OWN_IDENTITY_PREFIXES", ()),
            allow_file_uris=flag("PHOENIX_ALLOW_FILE_URIS", "false"),
            **election,
        )

    def may_use_own_identity(self, uri: str) -> bool:
        """Whether the operator's own identity may serve ``uri`` (a job without a Secret).
        A prefix matches at a path boundary only: s3://b/team does not allow s3://b/team2."""
        return any(uri == p.rstrip("/") or uri.startswith(p.rstrip("/") + "/")
                   for p in self.own_identity_prefixes)
