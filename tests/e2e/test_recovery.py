"""The whole system through a kubeconfig: the installed operator is up, and a real training
job (the example MLP) preempted mid-run resumes from its checkpoint and succeeds."""
from __future__ import annotations

import pytest

from kube_helpers import wait_for
from phoenix_e2e import GROUP, PLURAL, VERSION, phase_status, sample_job, unique

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _job(kube, e2e, name):
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, e2e.namespace, PLURAL, name)


def _pod_phase(kube, e2e, name):
    pods = kube.core.list_namespaced_pod(e2e.namespace, field_selector=f"metadata.name={name}")
    return pods.items[0].status.phase if pods.items else None


def _manifests(e2e, bucket, prefix):
    out = e2e.s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in out.get("Contents", ()) if o["Key"].endswith("/manifest.json")]


def test_operator_deployment_is_available(e2e, kube):
    dep = wait_for(lambda: (d := kube.apps.read_namespaced_deployment(
        e2e.operator_deployment, e2e.operator_namespace)) and (d.status.available_replicas or 0)
        >= 1 and d, 120, 0.5, f"deployment {e2e.operator_deployment} available",
        diagnose=e2e.operator_logs)
    pod_spec = dep.spec.template.spec
    assert pod_spec.security_context.run_as_non_root is True
    assert pod_spec.containers[0].security_context.read_only_root_filesystem is True


def test_preempted_training_job_resumes_from_checkpoint_and_succeeds(e2e, kube, e2e_bucket,
                                                                     submit_job):
    name = submit_job(sample_job(e2e, unique("mlp"), e2e_bucket))
    diagnose = lambda: f"job status: {_job(kube, e2e, name).get('status')}\n" \
        f"operator log:\n{e2e.operator_logs()}"  # noqa: E731
    first = f"{name}-train-1"
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
    second = kube.core.read_namespaced_pod(f"{name}-train-2", e2e.namespace)
    env = {e.name: e.value for e in second.spec.containers[0].env or [] if e.value}
    assert env.get("PHOENIX_RESUME_FROM", "").startswith(f"s3://{e2e_bucket}/{name}/")
    assert _manifests(e2e, e2e_bucket, f"{name}/")
    # what a user sees: `kubectl get pxj` with the printer columns
    header, row = e2e.kubectl("get", "pxj", name, "-n", e2e.namespace).stdout.splitlines()[:2]
    for column in ("STATUS", "PREEMPTIONS", "FAILURES"):
        assert column in header, header
    assert "Succeeded" in row.split(), row

