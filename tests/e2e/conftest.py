"""Fixtures of the e2e suite: one `e2e` target per session and S3 server (a cluster with
the chart installed, an S3 endpoint, a namespace with credentials), plus reusable per-test
pieces (`kube` clients, a fresh `e2e_bucket`, `submit_job` that cleans up after itself).

PHOENIX_E2E_KUBECONFIG set: run against that cluster (see phoenix_e2e.py for the other
PHOENIX_E2E_* variables; the kind workflow sets them); a test's id ends in `[external]`.
Unset: install the chart into the session's lab cluster (the operator image as a pod on a
real node, restricted Pod Security), watching only the e2e namespace; trainers run the
lab's trainer image. Neither possible: skip, saying why.

On the lab `e2e` is parametrized over the lab's S3 servers (`[versitygw]`, `[seaweedfs]`;
which of them a test runs against by default: tests/s3_selection.py). One chart install serves
both: its operators trust the lab CA (the chart's `storage.caBundle`), which signed
SeaweedFS's certificate; a job on SeaweedFS names the same CA in `spec.checkpoint.caBundle`
(`S3Target.checkpoint_tls`, which `sample_job` and `submit_job` add).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import uuid
from dataclasses import dataclass

import pytest
import yaml

import s3_selection
from phoenix_e2e import (CREDENTIALS_SECRET, DEFAULT_TRAINER_COMMAND, GROUP, LAB_CA_CONFIGMAP,
                         PLURAL, VERSION, E2ETarget, S3Target, apply_ca_configmap,
                         install_chart_on_lab, lab_ca_values)

LAB_NAMESPACE = "phoenix-e2e"
LAB_RELEASE = "phoenix-e2e"
LAB_RELEASE_NAMESPACE = "phoenix-e2e-system"


def _lab_unavailable() -> str | None:
    from phoenix_lab import paths

    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                 "kubelet", "coredns", "kubectl", "helm", "versitygw"):
        try:
            paths.binary(name)
        except FileNotFoundError as e:
            return str(e)
    return None


def _ensure_namespace_and_secret(target: E2ETarget) -> None:
    """The jobs' namespace with the target's S3 credentials (and CA, where it has one). Both
    lab servers' targets write the same names: the one whose tests run now holds them."""
    target.kubectl("create", "namespace", target.namespace, check=False)
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": CREDENTIALS_SECRET, "namespace": target.namespace},
              "stringData": {"AWS_ACCESS_KEY_ID": target.s3.access_key,
                             "AWS_SECRET_ACCESS_KEY": target.s3.secret_key}}
    target.kubectl("apply", "-f", "-", input=yaml.safe_dump(secret))
    if target.s3.ca_configmap:
        apply_ca_configmap(target.kubectl, target.namespace, target.s3.ca_bundle)


@pytest.fixture(scope="session")
def e2e_cluster(request) -> E2ETarget:
    """The cluster under test with the chart installed; its S3 target is the external one,
    or the lab's first server (the `e2e` fixture picks each test's)."""
    if os.environ.get("PHOENIX_E2E_KUBECONFIG"):
        yield E2ETarget.from_env()
        return
    reason = _lab_unavailable()
    if reason:
        pytest.skip("PHOENIX_E2E_KUBECONFIG is unset (no external cluster given) and the lab "
                    f"cannot start: {reason}")
    lab = request.getfixturevalue("lab")
    lab.kubectl("create", "namespace", LAB_NAMESPACE, check=False)
    # Watch only the e2e namespace: other operators a test session may run (tests/cluster)
    # stay out of our way, and the chart's namespaced RBAC mode gets exercised. The
    # operators trust the lab CA, as SeaweedFS's jobs need (plain-HTTP versitygw ignores it).
    release = install_chart_on_lab(lab, LAB_RELEASE, LAB_RELEASE_NAMESPACE, values={
        "rbac": {"scope": "namespaces", "namespaces": [LAB_NAMESPACE]},
        **lab_ca_values(lab, LAB_RELEASE_NAMESPACE)})
    target = E2ETarget(
        kubeconfig=lab.kubeconfig, namespace=LAB_NAMESPACE,
        operator_namespace=LAB_RELEASE_NAMESPACE, operator_release=LAB_RELEASE,
        s3=_lab_s3_target(lab, s3_selection.servers(os.environ)[0]),
        # The images exist only inside the lab's nodes: never pull.
        trainer_image=lab.trainer_image, image_pull_policy="Never",
        trainer_command=shlex.split(DEFAULT_TRAINER_COMMAND),
        extra={"lab": lab, "release": release})
    try:
        yield target
    finally:
        release.uninstall()


def _lab_s3_target(lab, name: str) -> S3Target:
    """The lab's S3 server `name`, started if need be; pods and this process reach it at
    the same host address."""
    s3 = lab.s3_server_for(name).endpoint
    return S3Target(s3.url, s3.url, s3.access_key, s3.secret_key, name=s3.name,
                    ca_bundle=s3.ca_bundle,
                    ca_configmap=LAB_CA_CONFIGMAP if s3.ca_bundle else None)


@pytest.fixture(scope="session", params=s3_selection.e2e_params(os.environ))
def e2e(request, e2e_cluster) -> E2ETarget:
    """The cluster under test, with the chart installed and a namespace ready for jobs on
    this parameter's S3 server."""
    target = e2e_cluster
    if request.param != s3_selection.EXTERNAL:
        lab = e2e_cluster.extra["lab"]
        target = dataclasses.replace(
            e2e_cluster, s3=_lab_s3_target(lab, request.param),
            # the server itself, for lab-only tests (its endpoint, an S3 outage)
            extra=dict(e2e_cluster.extra, s3_server=lab.s3_server_for(request.param)))
    _ensure_namespace_and_secret(target)
    return target


@pytest.fixture(autouse=True)
def _e2e_s3_trusted(request, monkeypatch):
    """A test on an S3 server with a private CA: boto3 anywhere in this process (the
    trainer's own storage code the tests read checkpoints with, a CLI they start) trusts it
    through AWS_CA_BUNDLE, as a trainer pod does."""
    if "e2e" in request.fixturenames:
        ca = request.getfixturevalue("e2e").s3.ca_bundle
        if ca:
            monkeypatch.setenv("AWS_CA_BUNDLE", ca)


@dataclass
class Kube:
    core: object
    custom: object
    apps: object


@pytest.fixture
def kube(e2e):
    from kubernetes import client

    with e2e.api_client() as api:
        yield Kube(client.CoreV1Api(api), client.CustomObjectsApi(api), client.AppsV1Api(api))


@pytest.fixture
def e2e_bucket(e2e) -> str:
    """A fresh bucket on the target's S3 server."""
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    e2e.s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def submit_job(e2e, kube):
    """submit_job(body) -> name: create a PhoenixJob in the e2e namespace; deleted (with its
    pods, by owner references) after the test."""
    created: list[str] = []

    def submit(body: dict) -> str:
        checkpoint = body.get("spec", {}).get("checkpoint")
        if checkpoint is not None and "caBundle" not in checkpoint:
            checkpoint.update(e2e.s3.checkpoint_tls())  # a private CA's endpoint: trust it
        kube.custom.create_namespaced_custom_object(GROUP, VERSION, e2e.namespace, PLURAL, body)
        created.append(body["metadata"]["name"])
        return body["metadata"]["name"]

    yield submit
    for name in created:
        try:
            kube.custom.delete_namespaced_custom_object(GROUP, VERSION, e2e.namespace, PLURAL,
                                                        name, propagation_policy="Background")
        except Exception:  # noqa: BLE001 - cleanup must not mask the test's result
            pass


