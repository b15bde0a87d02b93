"""Fixtures of the e2e suite: one `e2e` target per session (a cluster with the chart
installed, an S3 endpoint, a namespace with credentials), plus reusable per-test pieces
(`kube` clients, a fresh `e2e_bucket`, `submit_job` that cleans up after itself).

PHOENIX_E2E_KUBECONFIG set: run against that cluster (see phoenix_e2e.py for the other
PHOENIX_E2E_* variables; the kind workflow sets them). Unset: install the chart into the
session's lab cluster (the operator image as a pod on a real node, restricted Pod Security),
watching only the e2e namespace; trainers run the lab's trainer image. Neither possible:
skip, saying why.
"""
from __future__ import annotations

import os
import shlex
import uuid
from dataclasses import dataclass

import pytest
import yaml

from phoenix_e2e import (CREDENTIALS_SECRET, DEFAULT_TRAINER_COMMAND, GROUP, PLURAL, VERSION,
                         E2ETarget, S3Target, install_chart_on_lab)

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
    target.kubectl("create", "namespace", target.namespace, check=False)
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": CREDENTIALS_SECRET, "namespace": target.namespace},
              "stringData": {"AWS_ACCESS_KEY_ID": target.s3.access_key,
                             "AWS_SECRET_ACCESS_KEY": target.s3.secret_key}}
    target.kubectl("apply", "-f", "-", input=yaml.safe_dump(secret))


@pytest.fixture(scope="session")
def e2e(request) -> E2ETarget:
    """The cluster under test, with the chart installed and a namespace ready for jobs."""
    if os.environ.get("PHOENIX_E2E_KUBECONFIG"):
        target = E2ETarget.from_env()
        _ensure_namespace_and_secret(target)
        yield target
        return
    reason = _lab_unavailable()
    if reason:
        pytest.skip("PHOENIX_E2E_KUBECONFIG is unset (no external cluster given) and the lab "
                    f"cannot start: {reason}")
    lab = request.getfixturevalue("lab")
    lab.kubectl("create", "namespace", LAB_NAMESPACE, check=False)
    # Watch only the e2e namespace: other operators a test session may run (tests/cluster)
    # stay out of our way, and the chart's namespaced RBAC mode gets exercised.
    release = install_chart_on_lab(lab, LAB_RELEASE, LAB_RELEASE_NAMESPACE, values={
        "rbac": {"scope": "namespaces", "namespaces": [LAB_NAMESPACE]}})
    target = E2ETarget(
        kubeconfig=lab.kubeconfig, namespace=LAB_NAMESPACE,
        operator_namespace=LAB_RELEASE_NAMESPACE, operator_release=LAB_RELEASE,
        s3=S3Target(lab.s3.url, lab.s3.url, lab.s3.access_key, lab.s3.secret_key),
        # The images exist only inside the lab's nodes: never pull.
        trainer_image=lab.trainer_image, image_pull_policy="Never",
        trainer_command=shlex.split(DEFAULT_TRAINER_COMMAND),
        extra={"lab": lab, "release": release})
    _ensure_namespace_and_secret(target)
    try:
        yield target
    finally:
        release.uninstall()


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


