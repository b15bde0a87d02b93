"""Prometheus metrics. Names are prefixed ``phoenix_``; labels never carry secrets.

Series labelled by job are removed when the job is deleted (``forget_job``): with jobs coming
and going, a label set per job ever seen would grow the scrape without end.

Labels: ``namespace`` and ``phoenixjob`` name the PhoenixJob (not ``job``, which Prometheus
keeps for the scrape job: a ``job`` label of ours came out as ``exported_job``; the chart's
ServiceMonitor sets ``honorLabels`` so our ``namespace`` is not renamed either), ``phase`` is
always a phase of the job's spec, ``status`` a PhoenixJob's ``status.phase``."""
from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, REGISTRY

RECOVERIES = Counter(
    "phoenix_recoveries_total", "Trainer attempts that ended unsuccessfully, by cause.",
    ["namespace", "phoenixjob", "phase", "cause", "reason"])
REPLACEMENT_SECONDS = Histogram(
    "phoenix_time_to_replacement_seconds",
    "From a trainer pod's end to its replacement pod being created.", ["cause"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
PODS_CREATED = Counter("phoenix_pods_created_total", "Trainer pods created.", ["namespace"])
RECONCILES = Counter("phoenix_reconciles_total", "Reconcile passes, by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "phoenix_reconcile_duration_seconds", "Wall time of one reconcile pass.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
JOBS = Gauge("phoenix_jobs", "PhoenixJobs known to the operator, by status.phase.", ["status"])
# Notices, standbys and handoffs, counted as the operator acts on them (the plan's Events).
_STANDBY_HELP = {
    "phoenix_notices_total": "Preemption notices acted on (the trainer asked to checkpoint now).",
    "phoenix_standbys_started_total": "Standby pods (or standby gangs) started.",
    "phoenix_handoffs_total": "Trainers asked to hand off to their ready standby.",
    "phoenix_standby_promotions_total": "Standbys promoted to the active attempt.",
}
STANDBY_COUNTERS = {name: Counter(name, text, ["namespace", "phoenixjob"])
                    for name, text in _STANDBY_HELP.items()}
LEADER = Gauge("phoenix_operator_leader",
               "1 while this operator replica holds the leader Lease (writes), else 0.")
LEADER_TERM = Gauge("phoenix_operator_leader_term",
                    "The leader's term: the Lease's transition count at its acquisition.")
LEADER_TRANSITION = Gauge("phoenix_operator_leader_transition_timestamp_seconds",
                          "Unix time of this replica's last leadership change (0: none yet).")
LEADER_INFO = Gauge("phoenix_operator_leader_info",
                    "1 for the replica this one sees holding the Lease.", ["holder"])


class _CheckpointAge:
    """``phoenix_checkpoint_age_seconds``: computed at scrape time from the last known
    checkpoint time of each job's current phase."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str, str], float] = {}

    def collect(self):
        g = GaugeMetricFamily("phoenix_checkpoint_age_seconds",
                              "Seconds since the newest known checkpoint of the current phase.",
                              labels=["namespace", "phoenixjob", "phase"])
        now = time.time()
        for (ns, job, phase), t in list(self.times.items()):
            g.add_metric([ns, job, phase], max(0.0, now - t))
        yield g


CHECKPOINT_AGE = _CheckpointAge()
REGISTRY.register(CHECKPOINT_AGE)

# Label sets of job-labelled counters per (namespace, job), so they go with the job.
_job_labels: dict[tuple[str, str], set[tuple[Counter, tuple[str, ...]]]] = {}


def _count(counter: Counter, namespace: str, job: str, *rest: str) -> None:
    labels = (namespace, job, *rest)
    counter.labels(*labels).inc()
    _job_labels.setdefault((namespace, job), set()).add((counter, labels))


def count_recovery(namespace: str, job: str, phase: str, cause: str, reason: str) -> None:
    _count(RECOVERIES, namespace, job, phase, cause, reason)


def count_standby_event(namespace: str, job: str, metric: str) -> None:
    """One of ``STANDBY_COUNTERS`` (by name) for the job."""
    _count(STANDBY_COUNTERS[metric], namespace, job)


def set_checkpoint_time(namespace: str, job: str, phase: str | None, when: float | None) -> None:
    """The job's current phase's newest checkpoint time (None: none known)."""
    CHECKPOINT_AGE.times = {k: v for k, v in CHECKPOINT_AGE.times.items()
                            if k[:2] != (namespace, job)}
    if phase and when is not None:
        CHECKPOINT_AGE.times[(namespace, job, phase)] = when


def forget_job(namespace: str, job: str) -> None:
    """Drop every series labelled with this job."""
    for counter, labels in _job_labels.pop((namespace, job), ()):
        try:
            counter.remove(*labels)
        except KeyError:  # a progress series already removed by set_progress
            pass
    for key in [k for k in _rank_labels if k[:2] == (namespace, job)]:
        _rank_labels.pop(key, None)
    set_checkpoint_time(namespace, job, None, None)


class JobPhases:
    """``phoenix_jobs``: the last ``status.phase`` applied for each job the operator knows
    (also the keys a resync goes through)."""

    PHASES = ("Pending", "Running", "Recovering", "Succeeded", "Failed", "Suspended")

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}

    def __iter__(self):
        return iter(list(self._phases))

    def set(self, key: tuple[str, str], phase: str) -> None:
        self._phases[key] = phase
        self._update()

    def forget(self, key: tuple[str, str]) -> None:
        self._phases.pop(key, None)
        self._update()

    def _update(self) -> None:
        counts: dict[str, int] = {}
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase in self.PHASES:
            JOBS.labels(phase).set(counts.get(phase, 0))


def set_leader(leading: bool, holder: str, term: int, transition: float | None) -> None:
    """This replica's view of the election (``leader``); ``transition``: when it changed."""
    LEADER.set(1 if leading else 0)
    LEADER_TERM.set(term)
    if transition is not None:
        LEADER_TRANSITION.set(transition)
    LEADER_INFO.clear()
    if holder:
        LEADER_INFO.labels(holder).set(1)


def serve(port: int, host: str) -> None:
    if port:
        start_http_server(port, addr=host)


# --- progress (decide.hangs): per rank, from the running attempts' heartbeats ------------
RANK_STEP = Gauge("phoenix_rank_step_seconds",
                  "Median seconds per step of each rank of a running phase (its heartbeats).",
                  ["namespace", "phoenixjob", "phase", "rank"])
RANK_COMPUTE = Gauge("phoenix_rank_compute_seconds",
                     "Median compute seconds per step before the rank's first collective "
                     "(a gang's stragglers stand out here).",
                     ["namespace", "phoenixjob", "phase", "rank"])
LAST_STEP = Gauge("phoenix_last_step_timestamp_seconds",
                  "When the running phase last completed a step (status progress.lastStepTime).",
                  ["namespace", "phoenixjob", "phase"])
_rank_labels: dict[tuple[str, str, str], set[tuple[Gauge, tuple[str, ...]]]] = {}


def set_progress(namespace: str, job: str, phase: str,
                 ranks: list[tuple[int, float | None, float | None]],
                 last_step: float | None) -> None:
    """One phase's per-rank step and compute times and its last step time; series of ranks
    no longer reported (another attempt, fewer ranks) are removed."""
    key = (namespace, job, phase)
    now: set[tuple[Gauge, tuple[str, ...]]] = set()
    for rank, step, compute in ranks:
        for gauge, value in ((RANK_STEP, step), (RANK_COMPUTE, compute)):
            if value is not None:
                labels = (namespace, job, phase, str(rank))
                gauge.labels(*labels).set(value)
                now.add((gauge, labels))
    if last_step is not None:
        LAST_STEP.labels(namespace, job, phase).set(last_step)
        now.add((LAST_STEP, (namespace, job, phase)))
    for gauge, labels in _rank_labels.get(key, set()) - now:
        gauge.remove(*labels)
    _rank_labels[key] = now
    if now:
        _job_labels.setdefault((namespace, job), set()).update(now)


class _JobStatus:
    """Per-job gauges for the chart's dashboard and alerts, computed at scrape time from the
    status this replica last applied to each job (and the job's failure budget):

    - ``phoenix_job_status{status}``: 1 for the job's ``status.phase``, 0 for the others
      (so "not Recovering" is a series too, and an alert on it has something to compare);
    - ``phoenix_phase_failures`` / ``phoenix_phase_failure_budget``: a phase's failures so far
      and ``recovery.maxFailures`` (the phase fails at one more than the budget);
    - ``phoenix_phase_standby_failures``: the current attempt's standbys that failed in a row.

    Shown only while ``leading()``: a replica that lost the Lease would otherwise go on
    reporting the last status it applied (say, Recovering) for as long as it runs."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], tuple[str, int, tuple[tuple[str, int, int], ...]]] = {}
        self.leading = lambda: True

    def set(self, namespace: str, job: str, status: dict, max_failures: int) -> None:
        phases = tuple((str(p.get("name", "")), int(p.get("failures", 0)),
                        int(p.get("standbyFailures", 0)))
                       for p in status.get("phases") or () if p.get("name"))
        self.jobs[(namespace, job)] = (str(status.get("phase") or ""), max_failures, phases)

    def forget(self, namespace: str, job: str) -> None:
        self.jobs.pop((namespace, job), None)

    def collect(self):
        status = GaugeMetricFamily("phoenix_job_status",
                                   "1 for the PhoenixJob's status.phase, 0 for the others.",
                                   labels=["namespace", "phoenixjob", "status"])
        failures = GaugeMetricFamily("phoenix_phase_failures",
                                     "Failures charged to the phase's budget so far.",
                                     labels=["namespace", "phoenixjob", "phase"])
        budget = GaugeMetricFamily("phoenix_phase_failure_budget",
                                   "recovery.maxFailures: failures a phase may have (one more "
                                   "fails it).", labels=["namespace", "phoenixjob", "phase"])
        standby = GaugeMetricFamily("phoenix_phase_standby_failures",
                                    "Standbys of the current attempt that failed in a row.",
                                    labels=["namespace", "phoenixjob", "phase"])
        if self.leading():
            for (ns, job), (phase, max_failures, phases) in list(self.jobs.items()):
                for s in JobPhases.PHASES:
                    status.add_metric([ns, job, s], 1.0 if s == phase else 0.0)
                for name, n, standby_failures in phases:
                    failures.add_metric([ns, job, name], n)
                    budget.add_metric([ns, job, name], max_failures)
                    standby.add_metric([ns, job, name], standby_failures)
        yield from (status, failures, budget, standby)


JOB_STATUS = _JobStatus()
REGISTRY.register(JOB_STATUS)


def start_job_counters(namespace: str, job: str) -> None:
    """The job's notice, standby, hand-off and promotion counters, at 0 until the first one:
    a counter with no series yet shows as "no data" on a dashboard, not as none."""
    seen = _job_labels.setdefault((namespace, job), set())
    for counter in STANDBY_COUNTERS.values():
        if (counter, (namespace, job)) not in seen:
            counter.labels(namespace, job)
            seen.add((counter, (namespace, job)))
