"""Fixtures for operator cluster tests: the CRD, the chart's RBAC, and the operator running
as the chart's ServiceAccount (so a missing permission fails a test), plus per-test
namespaces with an S3 credentials Secret and a fresh bucket on the lab's S3 server."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from kube_helpers import Beacon
from operator_process import OPERATOR_NS, RELEASE, OperatorProcess
from pxj_helpers import create_job_namespace

REPO = Path(__file__).resolve().parents[2]
SA = f"{RELEASE}-operator"


@pytest.fixture(scope="session")
def crd(lab):
    lab.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "phoenixjobs.yaml"))
    lab.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                "crd/phoenixjobs.phoenix.dev")
    return "phoenixjobs.phoenix.dev"


@pytest.fixture(scope="session")
def operator_rbac(lab, crd):
    """ServiceAccount + ClusterRole/Binding exactly as the chart renders them."""
    lab.kubectl("create", "namespace", OPERATOR_NS, check=False)
    out = lab.helm("template", RELEASE, str(REPO / "charts" / "phoenix"), "-n", OPERATOR_NS,
                   "--skip-crds").stdout
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] in (
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    lab.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return lab.serviceaccount_kubeconfig(OPERATOR_NS, SA)


@pytest.fixture(scope="session")
def operator(lab, operator_rbac, tmp_path_factory):
    op = OperatorProcess(operator_rbac, tmp_path_factory.mktemp("operator"), lab.s3.url)
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def core(lab):
    with lab.api_client() as api:
        yield client.CoreV1Api(api)


@pytest.fixture
def custom(lab):
    with lab.api_client() as api:
        yield client.CustomObjectsApi(api)


@pytest.fixture
def ns(lab, core):
    """A fresh pxj-* namespace (see create_job_namespace), deleted afterwards."""
    name = create_job_namespace(lab, core)
    yield name
    core.delete_namespace(name)


@pytest.fixture
def recorder(lab):
    """A beacon fake trainers report their starts to (env FAKE_RECORD=recorder.address)."""
    beacon = Beacon(lab.host_ip)
    yield beacon
    beacon.close()


@pytest.fixture
def bucket(lab):
    name = f"pxj-{uuid.uuid4().hex[:10]}"
    lab.s3.client().create_bucket(Bucket=name)
    return name
