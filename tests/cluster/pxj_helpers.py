"""Builders and waiters for PhoenixJob cluster tests."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Callable

from kubernetes import client
from kubernetes.client.rest import ApiException

from kube_helpers import RESTRICTED_CONTAINER, TMP_MOUNT, TMP_VOLUME, create_namespace, wait_for
from operator_process import FAKE_TRAINER, FAKE_TRAINER_CONFIGMAP, FAKE_TRAINER_PATH

GROUP, VERSION, PLURAL = "phoenix.dev", "v1alpha1", "phoenixjobs"
LAB_CA_CONFIGMAP = "phoenix-lab-ca"  # the lab CA, key ca.crt (as tests/e2e names it)
SPOT_TOLERATION = [{"key": "phoenix.dev/spot", "operator": "Exists", "effect": "NoSchedule"}]


def phoenixjob(name: str, bucket: str, s3_url: str, *, image: str, phases=("train",), env=None,
               recovery=None, grace: int = 10, keep: int = 3, suspend: bool = False,
               extra_phase: dict | None = None) -> dict:
    """A PhoenixJob whose trainer is tests/cluster/fake_trainer.py in the trainer `image`,
    under restricted Pod Security, on the lab's spot nodes. An https:// `s3_url` (the lab's
    SeaweedFS) is trusted through the lab CA's ConfigMap that create_job_namespace makes."""
    fake_env = [{"name": k, "value": str(v)} for k, v in (env or {}).items()]
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "PhoenixJob",
        "metadata": {"name": name},
        "spec": {
            "template": {"spec": {
                "nodeSelector": {"phoenix.dev/spot": "true"},
                "tolerations": SPOT_TOLERATION,
                "volumes": [TMP_VOLUME, {"name": "fake", "configMap": {
                    "name": FAKE_TRAINER_CONFIGMAP}}],
                "containers": [{"name": "trainer", "image": image, "imagePullPolicy": "Never",
                                "command": ["python", FAKE_TRAINER_PATH], "env": fake_env,
                                "securityContext": RESTRICTED_CONTAINER,
                                "volumeMounts": [TMP_MOUNT, {"name": "fake",
                                                             "mountPath": "/opt/fake"}],
                                "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}},
            "phases": [dict({"name": p}, **((extra_phase or {}).get(p, {}))) for p in phases],
            "checkpoint": {"uri": f"s3://{bucket}/run", "endpoint": s3_url,
                           "credentialsSecret": "s3-creds", "keep": keep,
                           **({"caBundle": {"configMap": LAB_CA_CONFIGMAP}}
                              if s3_url.startswith("https://") else {})},
            "recovery": dict({"terminationGracePeriodSeconds": grace}, **(recovery or {})),
            "suspend": suspend,
        },
    }


def create(custom: client.CustomObjectsApi, ns: str, body: dict) -> dict:
    return custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)


def get(custom: client.CustomObjectsApi, ns: str, name: str) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def patch_spec(custom, ns, name, spec: dict) -> dict:
    return custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": spec})


def phase_status(job: dict, phase: str = "train") -> dict:
    for p in (job.get("status") or {}).get("phases") or ():
        if p["name"] == phase:
            return p
    return {}


def wait(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until truthy; only API errors are polled through (a bug in `fn` fails at once)."""
    return wait_for(fn, timeout, interval, what, retry_on=(ApiException,))


def pod_or_none(core, ns, name):
    try:
        return core.read_namespaced_pod(name, ns)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def trainer_pods(core, ns, job):
    return core.list_namespaced_pod(ns, label_selector=f"phoenix.dev/job={job}").items


def live(pods):
    return [p for p in pods if p.status.phase not in ("Succeeded", "Failed")]


def env_of(pod) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env or [] if e.value is not None}


def events(core, ns, name) -> list:
    return [e for e in core.list_namespaced_event(ns).items
            if e.involved_object.name == name and e.involved_object.kind == "PhoenixJob"]


def create_job_namespace(lab, core, prefix: str = "pxj", s3=None) -> str:
    """A fresh namespace with a credentials Secret for the lab's S3 server `s3` (default:
    versitygw, ``lab.s3``), the lab CA as a ConfigMap (for SeaweedFS's https endpoint) and
    the fake trainer's source as a ConfigMap. The cluster tests' operator watches pxj-* only."""
    s3 = s3 or lab.s3
    name = create_namespace(core, prefix)
    core.create_namespaced_secret(name, client.V1Secret(
        metadata=client.V1ObjectMeta(name="s3-creds"),
        string_data={"AWS_ACCESS_KEY_ID": s3.access_key,
                     "AWS_SECRET_ACCESS_KEY": s3.secret_key}))
    core.create_namespaced_config_map(name, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=LAB_CA_CONFIGMAP),
        data={"ca.crt": lab.pki.ca_cert.read_text()}))
    core.create_namespaced_config_map(name, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=FAKE_TRAINER_CONFIGMAP),
        data={"fake_trainer.py": FAKE_TRAINER.read_text()}))
    return name


def phoenix_cli(lab, *args: str) -> str:
    """The `phoenixctl` CLI against the lab, as a user runs it; its stdout (it must succeed)."""
    out = subprocess.run([sys.executable, "-m", "phoenix_operator.kubectl_phoenix", *args],
                         env=dict(os.environ, KUBECONFIG=lab.kubeconfig), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout
