"""Chaos: a seeded random schedule of at least ten disruptions of every kind hits one real
training job on the lab — eviction, SIGTERM with a 1 s grace, SIGKILL, node loss, the
operator killed mid-recovery, the S3 server down for 30 s. The job must succeed with final
weights equal to an uninterrupted run's, no two trainer pods of the phase may ever run at
once (a watch checks it throughout), and the status must count exactly the preemptions
that were injected and no failures.

Lab only: node loss, process kills and an S3 outage need the lab's hands. The seeds are
chosen with PHOENIX_CHAOS_SEEDS (default "1,2,3": three schedules in a row).
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from kube_helpers import wait_for
from phoenix_e2e import GROUP, PLURAL, VERSION, phase_status, unique
from phoenix_lab import samples
from phoenix_lab.chaos import Injector, is_preemption, plan

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEEDS = [int(s) for s in os.environ.get("PHOENIX_CHAOS_SEEDS", "1,2,3").split(",") if s.strip()]
DISRUPTIONS = 10
CFG = samples.TrainConfig(steps=2500, step_delay=0.03, checkpoint_every=20)
STEPS_BETWEEN = 30  # progress a new attempt makes before the next disruption


@pytest.fixture(scope="module")
def lab_target(e2e):
    if "lab" not in e2e.extra:
        pytest.skip("the chaos suite needs the lab (node loss, process kills, S3 outage)")
    return e2e.extra["lab"], e2e.extra["release"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return samples.run_reference(CFG, tmp_path_factory.mktemp("chaos-reference"))[0]


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
    def kill() -> str:
        pods = [p for p in release.operator_pods() if p["status"].get("phase") == "Running"]
        name = pods[0]["metadata"]["name"]
        lab.kill_pod(release.namespace, name, signal.SIGKILL)
        return f"operator pod {name}"
    return kill


@pytest.mark.parametrize("seed", SEEDS)
def test_chaos_schedule(seed, e2e, kube, e2e_bucket, submit_job, lab_target, reference):
    lab, release = lab_target
    schedule = plan(seed, DISRUPTIONS)
    name = unique(f"chaos{seed}")
    body = samples.phoenixjob(name, e2e.namespace, CFG, f"s3://{e2e_bucket}/{name}", lab.s3.url,
                              grace_seconds=10, credentials_secret="phoenix-e2e-s3", max_failures=0)  # any failure fails loudly
    watch = PodOverlapWatch(kube.core, e2e.namespace, name)
    submit_job(body)
    injector = Injector(lab, e2e.namespace, operator_kill=_operator_killer(lab, release))
    job = lambda: kube.custom.get_namespaced_custom_object(  # noqa: E731
        GROUP, VERSION, e2e.namespace, PLURAL, name)
    diagnose = lambda: (f"schedule {schedule}, injected {[(i.kind, i.pod) for i in injector.log]}\n"  # noqa: E731
                        f"status: {job().get('status')}\noperator:\n{release.operator_log()[-6000:]}")
    expected_preemptions = 0
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
                        progress = samples.logged_progress(
                            lab.pod_dir(e2e.namespace, pod.metadata.name) / "trainer.log")
                        start = int((pod.metadata.annotations or {}).get("phoenix.dev/resume-step") or 0)
                        if progress and progress[0] >= start + STEPS_BETWEEN:
                            return pod
                return None
            pod = wait_for(ready, 240, what=f"a trainer making progress before {kind}",
                           interval=0.3, diagnose=diagnose)
            if kind == "operator-kill":
                # Mid-recovery: evict the trainer, then kill the operator before it reacts.
                injector.inject("evict", pod.metadata.name)
                injector.inject("operator-kill", None)
                expected_preemptions += 1
                disrupted.add(pod.metadata.name)
            else:
                injector.inject(kind, pod.metadata.name, node=pod.spec.node_name)
                if is_preemption(kind):  # an S3 outage leaves the trainer running
                    expected_preemptions += 1
                    disrupted.add(pod.metadata.name)
        final = wait_for(lambda: (j := job()) and (j.get("status") or {}).get("phase")
                         in ("Succeeded", "Failed") and j, 600, what="the job to finish", interval=1,
                         diagnose=diagnose)
    finally:
        injector.wait_idle()
        watch.stop()
    assert final["status"]["phase"] == "Succeeded", diagnose()
    train = phase_status(final)
    assert watch.violations == [], f"two trainer pods ran at once: {watch.violations}"
    assert train["preemptions"] == expected_preemptions, diagnose()
    assert train["failures"] == 0, diagnose()
    assert len(injector.log) >= DISRUPTIONS
    assert {i.kind for i in injector.log} >= {"evict", "sigterm-short", "sigkill", "node-loss",
                                              "operator-kill", "s3-outage"}
    storage = samples.open_phase_storage(f"s3://{e2e_bucket}/{name}/train", lab.s3)
    same, uri = samples.final_weights_equal(storage, reference)
    assert same, f"final weights at {uri} differ from the uninterrupted run"
