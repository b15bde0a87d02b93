"""Fixtures for operator cluster tests: the CRD, the chart's RBAC, and the operator running
as the chart's ServiceAccount (so a missing permission fails a test), plus per-test
namespaces with an S3 credentials Secret and a fresh bucket on the lab's S3 server.

Tests that use the lab's S3 server (``lab_s3``, ``bucket``, ``ns``) run once per server, and
their ids say which (``[versitygw]``, ``[seaweedfs]``; tests/s3_selection.py says which of them
``make test`` runs). The operator processes trust the lab CA, which signed SeaweedFS's
certificate, through AWS_CA_BUNDLE as the chart's ``storage.caBundle`` sets it.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from phoenix_lab.s3 import S3Endpoint

import s3_selection
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
    op = OperatorProcess(operator_rbac, tmp_path_factory.mktemp("operator"), lab.s3.url,
                         env={"AWS_CA_BUNDLE": str(lab.pki.ca_cert)})
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


@pytest.fixture(scope="session", params=s3_selection.servers(os.environ))
def lab_s3_server(request, lab):
    """The lab's S3 server this parameter names, on the host address pods reach (SeaweedFS
    is started on first use)."""
    return lab.s3_server_for(request.param)


@pytest.fixture
def lab_s3(lab_s3_server, monkeypatch) -> S3Endpoint:
    """The endpoint of this test's lab S3 server. One with a private CA (SeaweedFS): boto3
    in this process and the operators a test starts trust it through AWS_CA_BUNDLE."""
    endpoint = lab_s3_server.endpoint
    if endpoint.ca_bundle:
        monkeypatch.setenv("AWS_CA_BUNDLE", endpoint.ca_bundle)
    return endpoint


@pytest.fixture
def ns(lab, core, lab_s3):
    """A fresh pxj-* namespace (see create_job_namespace), deleted afterwards."""
    name = create_job_namespace(lab, core, s3=lab_s3)
    yield name
    core.delete_namespace(name)


@pytest.fixture
def recorder(lab):
    """A beacon fake trainers report their starts to (env FAKE_RECORD=recorder.address)."""
    beacon = Beacon(lab.host_ip)
    yield beacon
    beacon.close()


@pytest.fixture
def bucket(lab_s3):
    name = f"pxj-{uuid.uuid4().hex[:10]}"
    lab_s3.client().create_bucket(Bucket=name)
    return name
