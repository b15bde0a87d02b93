"""Chaos: disruptions of every kind hit one real training job on the lab (the trainer image
on real kubelets; the chart's operator replicas, one leading) while the same training runs undisrupted on the
on-demand node as the reference.

- `test_every_disruption_once`: the fixed schedule - eviction, SIGTERM with a 1 s grace,
  SIGKILL of the container, node loss, the leading operator's container killed
  mid-recovery (the standby takes over once the lease runs out) and the S3 server down for
  30 s - right after the chart's install (every operator replica must run under restricted
  Pod Security and be Ready first).
- `test_chaos_schedule` (`make test-soak`): seeded random schedules of at least ten
  disruptions of the same kinds, in other orders and repeated.

During the fixed schedule a real Prometheus (lab/phoenix_lab/prometheus.py) scrapes every
operator replica with the chart's alert rules loaded; afterwards every query of the chart's
Grafana dashboard and the vector of every alert must return series from it.

Every job must succeed with final weights equal to the reference run's, tensor for tensor, and
none may be judged hung (the default hang rule sees no false positive under chaos);
no two trainer pods of the phase may ever run at once (a watch checks it throughout); the
status must count exactly the preemptions and failures that were injected (a bare SIGKILL of
the container is a failure: nothing says it came from outside); `phoenixctl report`, read from
the job's history, must agree with the test's own accounting (preemptions, failures, steps
lost per disruption), and `phoenixctl timeline --out` draws every attempt (the picture is kept
under PHOENIX_E2E_ARTIFACTS, default .pytest_cache/e2e-artifacts/).

Lab only: node loss, container kills and an S3 outage need the lab's hands. The seeded
schedules are chosen with PHOENIX_CHAOS_SEEDS (unset: none, so `make test` runs the fixed
schedule alone, which hits one job with every kind once; `make test-soak` sets "1,2,3").
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kube_helpers import wait_for
from phoenix_e2e import (CREDENTIALS_SECRET, GROUP, PLURAL, VERSION, check_operator_pods,
                         phase_status, unique)
from phoenix_lab import samples
from phoenix_trainer.core.layout import HISTORY_KEY
from phoenix_lab.chaos import ALL_DISRUPTIONS, Injector, is_failure, is_preemption, plan
from phoenix_lab.install import CHART
from phoenix_lab.prometheus import LabPrometheus, ScrapeTarget, alert_vectors, dashboard_queries

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEEDS = [int(s) for s in os.environ.get("PHOENIX_CHAOS_SEEDS", "").split(",") if s.strip()]
SEED_PARAMS = SEEDS or [pytest.param(0, marks=pytest.mark.skip(
    reason="seeded chaos schedules run in `make test-soak` (PHOENIX_CHAOS_SEEDS)"))]
DISRUPTIONS = 10
CFG = samples.TrainConfig(steps=2500, step_delay=0.03, checkpoint_every=20)
# Six disruptions need far fewer steps.
FIXED_CFG = samples.TrainConfig(steps=1000, step_delay=0.03, checkpoint_every=20)
STEPS_BETWEEN = 30  # progress a new attempt makes before the next disruption
# Where the run's timeline picture, text and report go (CI keeps this folder as an artifact).
ARTIFACTS = Path(os.environ.get("PHOENIX_E2E_ARTIFACTS")
                 or Path(__file__).resolve().parents[2] / ".pytest_cache" / "e2e-artifacts")


@pytest.fixture(scope="module")
def lab_target(e2e):
    if "lab" not in e2e.extra:
        pytest.skip("the chaos suite needs the lab (node loss, process kills, S3 outage)")
    return e2e.extra["lab"], e2e.extra["release"]


class PodOverlapWatch:
    """Watches the phase's trainer pods; records any moment two of them run at once."""

    def __init__(self, core, namespace: str, job: str) -> None:
        self.core, self.namespace = core, namespace
        self.selector = f"phoenix.dev/job={job},phoenix.dev/phase=train"
        self.running: set[str] = set()
        self.violations: list[str] = []
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(self.core.list_namespaced_pod, self.namespace,
                                   label_selector=self.selector, timeout_seconds=5):
                    pod = ev["object"]
                    name = pod.metadata.name
                    self.seen.add(name)
                    statuses = pod.status.container_statuses or []
                    live = (ev["type"] != "DELETED" and pod.status.phase == "Running"
                            and not any(s.state.terminated for s in statuses))
                    (self.running.add if live else self.running.discard)(name)
                    if len(self.running) > 1:
                        self.violations.append(f"{sorted(self.running)} at {time.time():.1f}")
                    if self._stop.is_set():
                        break
            except Exception:  # noqa: BLE001 - a dropped watch is simply restarted
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


def _operator_killer(lab, release):
    """SIGKILL the leader's container: it cannot release the Lease, so a standby takes over
    only when the lease runs out (or the restarted container leads again)."""
    def kill() -> str:
        name = release.leader_pod()["metadata"]["name"]
        lab.kill_pod(release.namespace, name, signal.SIGKILL)
        return f"leading operator pod {name}"
    return kill


def test_every_disruption_once(e2e, kube, e2e_bucket, submit_job, lab_target, tmp_path):
    """helm install -> every operator replica runs restricted and Ready -> one PhoenixJob is
    evicted, deleted with a 1 s grace, SIGKILLed, loses its node, is evicted while the
    leading operator is killed, and trains through an S3 outage -> Succeeded, with the
    reference run's final weights; a real Prometheus scraping the operators meanwhile
    answers every dashboard query and alert expression of the chart."""
    check_operator_pods(e2e, steady_seconds=10)
    lab, release = lab_target
    name = unique("every")
    started = time.monotonic()
    with scrape_operators(release, tmp_path / "prometheus") as prom:
        prom.wait_scraped()
        run_schedule(list(ALL_DISRUPTIONS), FIXED_CFG, name, e2e, kube, e2e_bucket,
                     submit_job, lab, release)
        # The leader's /metrics (bound to 0.0.0.0 in its pod, read at the pod IP) counted them.
        metrics = release.metrics()
        assert 'phoenix_recoveries_total{' in metrics, metrics[-2000:]
        check_monitoring(prom, e2e.namespace, name, int(time.monotonic() - started) + 1)


def scrape_operators(release, state_dir) -> LabPrometheus:
    """Prometheus scraping every operator replica at its pod IP, as the chart's
    ServiceMonitor would (job, namespace and pod target labels; honorLabels), with the
    chart's alert rules. The pods stay through the schedule (the operator-kill restarts a
    container, not the pod), so static targets do."""
    targets = []
    for pod in release.operators.pods():
        port = next(p["containerPort"] for c in pod["spec"]["containers"]
                    for p in c.get("ports") or () if p.get("name") == "metrics")
        targets.append(ScrapeTarget(f"{pod['status']['podIP']}:{port}", {
            "namespace": release.namespace, "pod": pod["metadata"]["name"]}))
    assert len(targets) >= 2, f"expected every operator replica: {targets}"
    return LabPrometheus(state_dir, f"{release.release}-operator", targets,
                         rule_files=[CHART / "rules" / "phoenix-alerts.yaml"])


def check_monitoring(prom: LabPrometheus, namespace: str, job: str, seconds: int) -> None:
    """Every dashboard query and every alert's vector returns series; the rules evaluate
    cleanly; the per-job gauges tell the truth about the job that just finished."""
    prom.wait_scraped()  # a few scrapes after the job's end
    broken = [(r["name"], r["lastError"]) for r in prom.rules() if r["health"] != "ok"]
    assert broken == [], broken
    queries = dashboard_queries(CHART / "dashboards" / "phoenix.json", range_=f"{seconds}s")
    queries += alert_vectors(CHART / "rules" / "phoenix-alerts.yaml")
    empty = [(title, expr) for title, expr in queries if not prom.query(expr)]
    assert empty == [], f"no series for: {empty}\ntargets: {prom.scrapes()}"
    job_sel = f'namespace="{namespace}", phoenixjob="{job}"'
    assert [r["metric"]["status"] for r in prom.query(f"phoenix_job_status{{{job_sel}}} == 1")] \
        == ["Succeeded"]
    assert prom.query(f"phoenix_phase_failures{{{job_sel}}}")[0]["value"][1] == \
        str(sum(map(is_failure, ALL_DISRUPTIONS)))
    assert prom.query("max(phoenix_operator_leader)")[0]["value"][1] == "1"


@pytest.mark.soak
@pytest.mark.parametrize("seed", SEED_PARAMS)
def test_chaos_schedule(seed, e2e, kube, e2e_bucket, submit_job, lab_target):
    schedule = plan(seed, DISRUPTIONS)
    injected = run_schedule(schedule, CFG, unique(f"chaos{seed}"), e2e, kube, e2e_bucket,
                            submit_job, *lab_target)
    assert len(injected) >= DISRUPTIONS
    assert {i.kind for i in injected} >= {"evict", "sigterm-short", "sigkill", "node-loss",
                                          "operator-kill", "s3-outage"}


def run_schedule(schedule, cfg, name, e2e, kube, e2e_bucket, submit_job, lab, release):
    """Run one job through `schedule` next to its reference run; check everything the
    module docstring promises. Returns what was injected."""
    s3 = e2e.extra["s3_server"].endpoint  # this parameter's lab S3 server
    body = samples.phoenixjob(name, e2e.namespace, cfg, f"s3://{e2e_bucket}/{name}", s3.url,
                              image=lab.trainer_image, grace_seconds=10,
                              credentials_secret=CREDENTIALS_SECRET,
                              # only the injected ones: any other failure fails loudly
                              max_failures=sum(map(is_failure, schedule)))
    reference = samples.ReferenceRun(lab, e2e.namespace, f"{name}-ref", cfg,
                                     f"s3://{e2e_bucket}/{name}-ref",
                                     credentials_secret=CREDENTIALS_SECRET, s3=s3)
    watch = PodOverlapWatch(kube.core, e2e.namespace, name)
    submit_job(body)
    submit_job(reference.manifest)  # started alongside; deleted after the test like the job
    injector = Injector(lab, e2e.namespace, operator_kill=_operator_killer(lab, release),
                        s3_server=e2e.extra["s3_server"])
    job = lambda: kube.custom.get_namespaced_custom_object(  # noqa: E731
        GROUP, VERSION, e2e.namespace, PLURAL, name)
    diagnose = lambda: (f"schedule {schedule}, injected {[(i.kind, i.pod, i.detail) for i in injector.log]}\n"  # noqa: E731
                        f"status: {job().get('status')}\n"
                        f"reference status: {reference.job().get('status')}\n"
                        f"operator:\n{release.operator_log()[-6000:]}")
    expected_preemptions = expected_failures = 0
    disrupted: set[str] = set()
    try:
        for kind in schedule:
            # Wait for a running trainer that has made progress since it (re)started.
            def ready():
                if injector.s3_busy():
                    return None
                for pod in kube.core.list_namespaced_pod(
                        e2e.namespace, label_selector=watch.selector).items:
                    if (pod.status.phase == "Running" and not pod.metadata.deletion_timestamp
                            and pod.metadata.name not in disrupted):
                        progress = samples.logged_progress(lab, e2e.namespace, pod.metadata.name)
                        start = int((pod.metadata.annotations or {}).get("phoenix.dev/resume-step") or 0)
                        if progress and progress[0] >= start + STEPS_BETWEEN:
                            return pod
                return None
            # Generous: after an operator-kill the next recovery waits for a new leader (a
            # standby once the killed leader's lease runs out, or the restarted container),
            # and every kill of a session lengthens the kubelet's restart back-off of the
            # killed container (10 s, doubling, up to 300 s).
            pod = wait_for(ready, 480, what=f"a trainer making progress before {kind}",
                           interval=0.5, diagnose=diagnose)
            if kind == "operator-kill":
                # Mid-recovery: evict the trainer, then kill the operator before it reacts.
                injector.inject("evict", pod.metadata.name)
                injector.inject("operator-kill", None)
                expected_preemptions += 1
                disrupted.add(pod.metadata.name)
            else:
                injector.inject(kind, pod.metadata.name, node=pod.spec.node_name)
                if is_preemption(kind) or is_failure(kind):  # S3 outage: trainer runs on
                    expected_preemptions += is_preemption(kind)
                    expected_failures += is_failure(kind)
                    disrupted.add(pod.metadata.name)
        final = wait_for(lambda: (j := job()) and (j.get("status") or {}).get("phase")
                         in ("Succeeded", "Failed") and j, 600, what="the job to finish", interval=1,
                         diagnose=diagnose)
    finally:
        aftermath = injector.wait_idle()
        watch.stop()
    assert final["status"]["phase"] == "Succeeded", diagnose()
    assert aftermath == [], aftermath
    train = phase_status(final)
    assert watch.violations == [], f"two trainer pods ran at once: {watch.violations}"
    assert train["preemptions"] == expected_preemptions, diagnose()
    assert train["failures"] == expected_failures, diagnose()
    assert set(schedule) <= {i.kind for i in injector.log}
    # No false hang: restores, emergency saves and the S3 outage stay under the default rule.
    hung = kube.core.list_namespaced_event(
        e2e.namespace, field_selector=f"involvedObject.name={name},reason=Hung").items
    assert hung == [] and "hangs" not in train, [e.message for e in hung]
    reference_job = reference.wait(timeout=300)
    assert phase_status(reference_job)["preemptions"] == 0, reference_job["status"]
    storage = samples.open_phase_storage(f"s3://{e2e_bucket}/{name}/train", s3)
    same, uri = samples.final_weights_equal(storage, reference.storage())
    assert same, (f"final weights at {uri} differ from the uninterrupted run's: "
                  f"{samples.divergence(storage, reference.storage())}")
    check_history(e2e, name, storage, injector.log, expected_preemptions, expected_failures,
                  train["attempts"])
    return injector.log


def phoenix_cli(e2e, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "phoenix_operator.kubectl_phoenix", *args,
                          "--kubeconfig", e2e.kubeconfig, "-n", e2e.namespace,
                          "--endpoint", e2e.s3.local_endpoint],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def check_history(e2e, name, storage, injected, preemptions, failures, attempts):
    """`phoenixctl report` (from the job's history in storage) agrees with this test's own
    accounting: the preemptions and failures injected, and per disrupted attempt the steps
    it lost - the last step its trainer reported (its attempt log: samples.attempt_ends)
    minus the step the next attempt started from (samples.attempt_starts); `phoenixctl
    timeline` shows every attempt, and its picture is kept as an artifact."""
    doc = json.loads(phoenix_cli(e2e, "report", name, "-o", "json").stdout)
    assert (doc["preemptions"], doc["failures"], doc["completed"]) == (preemptions, failures, 1), doc
    reached, began = samples.attempt_ends(storage), samples.attempt_starts(storage)
    ours = {}
    for i in injected:
        if not (is_preemption(i.kind) or is_failure(i.kind)):
            continue  # operator-kill, s3-outage: the attempt trains on
        attempt = int(i.pod.rsplit("-", 1)[-1])
        later = [a for a in began if a > attempt]
        ours[attempt] = reached[attempt] - began[min(later)][0]
    theirs = {d["attempt"]: d["stepsLost"] for d in doc["disruptions"]}
    assert theirs == ours, (theirs, ours, doc)
    assert doc["stepsLost"]["total"] == sum(ours.values())
    assert doc["timeToResume"]["count"] == preemptions + failures
    text = phoenix_cli(e2e, "timeline", name).stdout
    assert max(len(line) for line in text.splitlines()) <= 100, text
    for attempt in range(1, attempts + 1):
        if attempt in began:  # every attempt that trained (a standby number may be skipped)
            assert f"train #{attempt} " in text, text
    out = ARTIFACTS / f"{name}-timeline.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    phoenix_cli(e2e, "timeline", name, "--out", str(out))
    assert out.stat().st_size > 10_000  # a real picture, kept for people to look at
    (ARTIFACTS / f"{name}-timeline.txt").write_text(text)
    (ARTIFACTS / f"{name}-report.json").write_text(json.dumps(doc, indent=2))
    (ARTIFACTS / f"{name}-history.jsonl").write_bytes(storage.get_bytes(HISTORY_KEY))
