"""The Helm chart against the lab's real API server: every rendered manifest passes server-side
validation, and an installed release runs the operator image as a pod on a real node (as the
chart's ServiceAccount, under the chart's RBAC and restricted Pod Security) that recovers a
preempted job without ever restarting, then uninstalls without leftovers."""
from __future__ import annotations

import json

import pytest
import yaml

from e2e.phoenix_e2e import OPERATOR_KINDS, install_chart_on_lab, lab_ca_values
from kube_helpers import wait_for
from phoenix_lab.install import CHART, LAB_VALUES
from phoenix_operator.podspec import pod_name
from pxj_helpers import (create, create_job_namespace, get, phase_status, phoenixjob,
                         pod_or_none)

pytestmark = pytest.mark.cluster

SAMPLE_VALUES = CHART / "ci" / "namespaced-values.yaml"
# Just enough of prometheus-operator's CRD for the API server to accept a ServiceMonitor.
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
             "names": {"kind": "ServiceMonitor", "plural": "servicemonitors",
                       "singular": "servicemonitor", "listKind": "ServiceMonitorList"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                 "openAPIV3Schema": {"type": "object",
                                     "x-kubernetes-preserve-unknown-fields": True}}}]},
}


@pytest.fixture(scope="module")
def service_monitor_crd(lab):
    lab.kubectl("apply", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
    lab.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                "crd/servicemonitors.monitoring.coreos.com")
    yield
    lab.kubectl("delete", "crd", "servicemonitors.monitoring.coreos.com", "--wait=false",
                check=False)


@pytest.mark.parametrize("values", [
    pytest.param([], id="defaults"),
    pytest.param(["-f", str(LAB_VALUES)], id="lab"),
    pytest.param(["-f", str(SAMPLE_VALUES)], id="namespaced-servicemonitor"),
    pytest.param(["--set", "rbac.scope=namespaces", "--set", "rbac.namespaces={dry-a}",
                  "--set", "rbac.clusterDiscovery=false", "--set", "serviceAccount.create=false",
                  "--set", "serviceAccount.name=existing"], id="namespaced-bring-your-own-sa"),
])
def test_every_rendered_manifest_passes_server_dry_run(lab, crd, service_monitor_crd, values):
    for namespace in ("phoenix-dry", "team-a", "team-b", "dry-a"):
        lab.kubectl("create", "namespace", namespace, check=False)
    rendered = lab.helm("template", "dry", str(CHART), "-n", "phoenix-dry", "--include-crds",
                        *values).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert {"Deployment", "CustomResourceDefinition"} <= {d["kind"] for d in docs}
    # --server-side: the CRD is too large for client-side apply's last-applied annotation.
    out = lab.kubectl("apply", "--dry-run=server", "--server-side", "--force-conflicts",
                      "-f", "-", input=yaml.safe_dump_all(docs))
    applied = [line for line in out.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(docs), out.stdout


@pytest.fixture(scope="module")
def release(lab, crd):
    """The chart installed cluster-wide with the lab's values (as a user would on the lab):
    the operator image as a pod on the on-demand node, trusting the lab CA (SeaweedFS)."""
    rel = install_chart_on_lab(lab, "phx-chart", "phx-chart-system",
                               values=lab_ca_values(lab, "phx-chart-system"))
    yield rel
    rel.uninstall()


@pytest.fixture
def ns(lab, core, lab_s3):
    """A job namespace outside pxj-*, so only the chart's operator acts on it (the cluster
    tests' host-process operator watches pxj-* only)."""
    name = create_job_namespace(lab, core, prefix="chart", s3=lab_s3)
    yield name
    core.delete_namespace(name)


def _manifests(s3, bucket: str) -> list[str]:
    out = s3.client().list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in out.get("Contents", ()) if o["Key"].endswith("manifest.json")]


def _labelled(lab, kind: str, release: str) -> list[str]:
    out = lab.kubectl("get", kind, "-A", "-l", f"app.kubernetes.io/instance={release}",
                      "-o", "name", check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


# full: the e2e suite installs the chart and recovers a preempted job in make test
@pytest.mark.full
def test_installed_operator_runs_as_chart_serviceaccount_and_recovers_preempted_job(
        lab, lab_s3, release, core, custom, ns, bucket):
    pod = release.leader_pod()
    spec = pod["spec"]
    assert spec["serviceAccountName"] == "phx-chart-operator"
    assert spec["nodeName"] == "lab-ondemand-0", "operator landed on a spot node"
    [container] = spec["containers"]
    assert container["image"] == lab.operator_image
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The image's own user (65532, numeric: runAsNonRoot is verifiable) under restricted PSS.
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert release.healthy()  # kopf's /healthz at the pod's IP
    # The chart's RBAC is what the pod gets: it may create pods but not, say, Deployments.
    can_i = lambda *a: lab.kubectl(  # noqa: E731
        "auth", "can-i", *a, "--as=system:serviceaccount:phx-chart-system:phx-chart-operator",
        check=False).stdout.strip()
    assert can_i("create", "pods", "-n", ns) == "yes"
    assert can_i("create", "deployments", "-n", ns) == "no"
    assert can_i("update", "phoenixjobs.phoenix.dev", "-n", ns) == "no"
    assert can_i("watch", "nodes") == "yes" and can_i("delete", "nodes") == "no"

    def describe() -> str:
        job = lab.kubectl("-n", ns, "get", "pxj,pods", "-o", "wide", check=False).stdout
        return f"{job}\n{release.describe()}"

    env = {"FAKE_STEPS": 200, "FAKE_STEP_SECONDS": 0.05, "FAKE_CKPT_EVERY": 5}
    create(custom, ns, phoenixjob("chart", bucket, lab_s3.url, image=lab.trainer_image, env=env))
    wait_for(lambda: (p := pod_or_none(core, ns, pod_name("chart", "train", 1)))
             and p.status.phase == "Running", 90, 0.5, "attempt 1 running", diagnose=describe)
    wait_for(lambda: _manifests(lab_s3, bucket), 60, 0.5, "a first checkpoint in S3",
             diagnose=describe)
    lab.evict(ns, pod_name("chart", "train", 1))
    job = wait_for(lambda: (j := get(custom, ns, "chart"))
                   and (j.get("status") or {}).get("phase") == "Succeeded" and j,
                   120, 0.5, "job Succeeded after the preemption", diagnose=describe)
    ps = phase_status(job)
    assert ps["preemptions"] == 1 and ps["failures"] == 0 and ps["attempts"] == 2
    assert ps["lastFailure"]["reason"] == "EvictionByEvictionAPI", ps["lastFailure"]
    assert pod_or_none(core, ns, pod_name("chart", "train", 2)).metadata.labels["phoenix.dev/job"] == "chart"
    log = release.operator_log()
    assert f"{ns}/chart" in log, "the chart's operator did not log about the job:\n" + log[-3000:]
    # Scraped as Prometheus does through the chart's metrics Service (its ServiceMonitor):
    # every endpoint, i.e. every replica, on its own (apiserver proxy). The leader counted
    # the recovery; the standby says it stands by and has no job series to add to sums.
    scraped = {}
    for replica in release.operators.pods():
        name = replica["metadata"]["name"]
        scraped[name] = lab.kubectl("get", "--raw", f"/api/v1/namespaces/phx-chart-system/pods/"
                                    f"{name}:8080/proxy/metrics").stdout
    leader = pod["metadata"]["name"]
    assert len(scraped) == 2 and leader in scraped, list(scraped)
    assert "phoenix_recoveries_total{" in scraped[leader], scraped[leader][-2000:]
    assert "phoenix_operator_leader 1.0" in scraped[leader].splitlines()
    [standby] = [text for name, text in scraped.items() if name != leader]
    assert "phoenix_operator_leader 0.0" in standby.splitlines()
    assert "phoenix_recoveries_total{" not in standby, standby[-2000:]
    # The same pod did all of it: it never crashed or restarted.
    assert release.check_not_broken()
    assert release.leader_pod()["metadata"]["uid"] == pod["metadata"]["uid"]


def test_a_crash_looping_operator_fails_the_install(lab, crd):
    """The guard the tests above rely on: an operator container that exits is reported at
    once, with its log, rather than passing or timing out."""
    code = "print('operator exploding on purpose', flush=True); raise SystemExit(3)"
    with pytest.raises(AssertionError) as err:
        install_chart_on_lab(lab, "phx-broken", "phx-broken-system", values={
            "command": ["python", "-c", code]}, timeout=120)
    try:
        # the broken-pod check, not the timeout, and with the container's own output
        assert "is broken" in str(err.value), str(err.value)[-3000:]
        assert "exploding on purpose" in str(err.value), str(err.value)[-3000:]
    finally:
        lab.helm("uninstall", "phx-broken", "-n", "phx-broken-system", "--wait", check=False)


def test_uninstall_leaves_no_operator_objects_but_keeps_the_crd(lab, release, crd):
    # runs after the recovery test (module order); uninstalling twice is harmless
    assert _labelled(lab, "deployments", "phx-chart")
    release.uninstall()
    for kind in OPERATOR_KINDS:
        assert _labelled(lab, kind, "phx-chart") == [], f"{kind} left behind"
    assert lab.kubectl("get", "crd", crd, check=False).returncode == 0
