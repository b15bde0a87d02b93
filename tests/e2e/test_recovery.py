"""The whole system through a kubeconfig: the installed operator pods run under restricted
Pod Security and stay Ready, one of them leading, and a real training job (the example MLP in the trainer image)
preempted mid-run resumes from its checkpoint and succeeds, on each lab S3 server."""
from __future__ import annotations


import pytest

from phoenix_operator.podspec import pod_name
from phoenix_e2e import (check_operator_pods, evict_first_attempt_and_finish, manifests,
                         resume_startup, sample_job, unique)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


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


# The one e2e test `make test` runs against SeaweedFS too (TLS with the lab CA, through
# spec.checkpoint.caBundle and the chart's storage.caBundle; about 25 s there): the others
# run there under `make test-s3-all` (tests/s3_selection.py).
@pytest.mark.all_s3_servers
def test_preempted_training_job_resumes_from_checkpoint_and_succeeds(e2e, kube, e2e_bucket,
                                                                     submit_job):
    name = submit_job(sample_job(e2e, unique("mlp"), e2e_bucket))
    evict_first_attempt_and_finish(e2e, kube, e2e_bucket, name)
    # the replacement resumed from a checkpoint the operator validated, not from scratch
    second = kube.core.read_namespaced_pod(pod_name(name, "train", 2), e2e.namespace)
    env = {e.name: e.value for e in second.spec.containers[0].env or [] if e.value}
    assert env.get("PHOENIX_RESUME_FROM", "").startswith(f"s3://{e2e_bucket}/{name}/")
    assert manifests(e2e, e2e_bucket, f"{name}/")
    # ...downloaded while the script imported torch (the image's start-up prefetch), and
    # says where its start-up went
    startup = resume_startup(e2e, e2e_bucket, name)
    assert startup["total"] >= startup["beforeSession"] + startup["restore"], startup
    # what a user sees: `kubectl get pxj` with the printer columns
    header, row = e2e.kubectl("get", "pxj", name, "-n", e2e.namespace).stdout.splitlines()[:2]
    for column in ("STATUS", "PREEMPTIONS", "FAILURES"):
        assert column in header, header
    assert "Succeeded" in row.split(), row

