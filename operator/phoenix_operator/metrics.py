"""Prometheus metrics. Names are prefixed ``phoenix_``; labels never carry secrets."""
from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, REGISTRY

RECOVERIES = Counter(
    "phoenix_recoveries_total", "Trainer attempts that ended unsuccessfully, by cause.",
    ["namespace", "job", "phase", "cause", "reason"])
REPLACEMENT_SECONDS = Histogram(
    "phoenix_time_to_replacement_seconds",
    "From a trainer pod's end to its replacement pod being created.", ["cause"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
PODS_CREATED = Counter("phoenix_pods_created_total", "Trainer pods created.", ["namespace"])
RECONCILES = Counter("phoenix_reconciles_total", "Reconcile passes, by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "phoenix_reconcile_duration_seconds", "Wall time of one reconcile pass.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
JOBS = Gauge("phoenix_jobs", "PhoenixJobs known to the operator, by status.phase.", ["phase"])


class _CheckpointAge:
    """``phoenix_checkpoint_age_seconds``: computed at scrape time from the last known
    checkpoint time of each job's current phase."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str, str], float] = {}

    def collect(self):
        g = GaugeMetricFamily("phoenix_checkpoint_age_seconds",
                              "Seconds since the newest known checkpoint of the current phase.",
                              labels=["namespace", "job", "phase"])
        now = time.time()
        for (ns, job, phase), t in list(self.times.items()):
            g.add_metric([ns, job, phase], max(0.0, now - t))
        yield g


CHECKPOINT_AGE = _CheckpointAge()
REGISTRY.register(CHECKPOINT_AGE)


def serve(port: int, host: str) -> None:
    if port:
        start_http_server(port, addr=host)
