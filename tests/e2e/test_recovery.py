"""The whole system through a kubeconfig: the installed operator pods run under restricted
Pod Security and stay Ready, one of them leading, and a real training job (the example MLP in the trainer image)
preempted mid-run resumes from its checkpoint and succeeds."""
from __future__ import annotations

import json

import pytest

from kube_helpers import wait_for
from phoenix_operator.podspec import pod_name
from phoenix_e2e import (GROUP, PLURAL, VERSION, check_operator_pods, phase_status, sample_job,
                         unique)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _job(kube, e2e, name):
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, e2e.namespace, PLURAL, name)


def _pod_phase(kube, e2e, name):
    pods = kube.core.list_namespaced_pod(e2e.namespace, field_selector=f"metadata.name={name}")
    return pods.items[0].status.phase if pods.items else None


def _manifests(e2e, bucket, prefix):
    out = e2e.s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in out.get("Contents", ()) if o["Key"].endswith("/manifest.json")]


def test_operator_pods_run_restricted_and_stay_ready(e2e, kube):
    """The operator image as the chart runs it: every replica's pod (not just the template)
    satisfies the restricted Pod Security Standard, as the apiserver's own PodSecurity check
    confirms, turns Ready (the probe is kopf's /healthz, answered once the operator watches)
    and stays Ready with no restart, and one of them holds the Lease. An image that crashes
    at start, or soon after, fails here."""
    leader = check_operator_pods(e2e)
    assert leader["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert leader["spec"]["securityContext"]["runAsNonRoot"] is True
    dep = kube.apps.read_namespaced_deployment(e2e.operator_deployment, e2e.operator_namespace)
    assert dep.status.available_replicas == dep.spec.replicas, dep.status


def test_preempted_training_job_resumes_from_checkpoint_and_succeeds(e2e, kube, e2e_bucket,
                                                                     submit_job):
    name = submit_job(sample_job(e2e, unique("mlp"), e2e_bucket))
    diagnose = lambda: f"job status: {_job(kube, e2e, name).get('status')}\n" \
        f"operator log:\n{e2e.operator_logs()}"  # noqa: E731
    first = pod_name(name, "train", 1)
    wait_for(lambda: _pod_phase(kube, e2e, first) == "Running", 180, 0.5, f"{first} running",
             diagnose=diagnose)
    wait_for(lambda: _manifests(e2e, e2e_bucket, f"{name}/"), 180, 0.5,
             "a first checkpoint in S3", diagnose=diagnose)
    e2e.evict(e2e.namespace, first)

    job = wait_for(lambda: (j := _job(kube, e2e, name))
                   and (j.get("status") or {}).get("phase") in ("Succeeded", "Failed") and j,
                   420, 2, "job finished", diagnose=diagnose)
    assert job["status"]["phase"] == "Succeeded", diagnose()
    ps = phase_status(job)
    assert ps["preemptions"] >= 1 and ps["failures"] == 0, ps
    assert ps["attempts"] >= 2
    # the replacement resumed from a checkpoint the operator validated, not from scratch
    second = kube.core.read_namespaced_pod(pod_name(name, "train", 2), e2e.namespace)
    env = {e.name: e.value for e in second.spec.containers[0].env or [] if e.value}
    assert env.get("PHOENIX_RESUME_FROM", "").startswith(f"s3://{e2e_bucket}/{name}/")
    assert _manifests(e2e, e2e_bucket, f"{name}/")
    # ...downloaded while the script imported torch (the image's start-up prefetch), and
    # says where its start-up went
    body = e2e.s3.client().get_object(Bucket=e2e_bucket, Key=f"{name}/train/metrics/attempt-2.jsonl")
    resumed = next(r for r in map(json.loads, body["Body"].read().decode().splitlines())
                   if r["event"] == "resume")
    startup = resumed["startup"]
    assert startup["prefetch"]["bytes"] > 0 and "error" not in startup["prefetch"], startup
    assert startup["total"] >= startup["beforeSession"] + startup["restore"], startup
    # what a user sees: `kubectl get pxj` with the printer columns
    header, row = e2e.kubectl("get", "pxj", name, "-n", e2e.namespace).stdout.splitlines()[:2]
    for column in ("STATUS", "PREEMPTIONS", "FAILURES"):
        assert column in header, header
    assert "Succeeded" in row.split(), row

