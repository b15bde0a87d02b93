"""The job's storage credentials and addressing, on both sides (issue 29): the trainer pod's
env (keys and an optional session token by secretKeyRef, never values; the addressing style
the job asked for), the operator's own client (``Gather.storage_access``: the same keys, the
same style), the Secret read, and the CRD field's schema."""
from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from kubernetes import client

from phoenix_operator.config import OperatorConfig
from phoenix_operator.kube import Kube
from phoenix_operator.phoenixjob import JobSpec
from phoenix_operator.podspec import phoenix_env
from phoenix_operator.reconcile import Reconciler
from phoenix_trainer.core import contract
from phoenix_trainer.core.storage import Credentials

from opfacts import job

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
TOKEN = "FwoGZXIvYXdzEXAMPLETOKEN"


def _env(checkpoint: dict) -> dict[str, dict]:
    body = job()
    body["spec"]["checkpoint"] = checkpoint
    spec = JobSpec.parse(body["spec"])
    items = phoenix_env(job="j", namespace="ns", spec=spec, phase=spec.phases[0], attempt=1,
                        resume_from=None, init_from=None)
    return {e["name"]: e for e in items}


def test_trainer_gets_the_session_token_by_reference_and_optional():
    env = _env({"uri": "s3://b/run", "credentialsSecret": "creds"})
    assert env["AWS_SESSION_TOKEN"] == {"name": "AWS_SESSION_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "creds", "key": "AWS_SESSION_TOKEN", "optional": True}}}
    # the key pair stays required: a Secret without it fails the pod visibly
    assert "optional" not in env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
    assert all("value" not in env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                               "AWS_SESSION_TOKEN"))
    # no Secret: no keys at all, the pod's own identity (boto3's default chain)
    bare = _env({"uri": "s3://b/run"})
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(bare)


@pytest.mark.parametrize("checkpoint,env_style", [
    ({"uri": "s3://b/run"}, None),  # auto: the trainer decides from its endpoint, as we do
    ({"uri": "s3://b/run", "addressingStyle": "auto"}, None),
    ({"uri": "s3://b/run", "addressingStyle": "path"}, "path"),
    ({"uri": "s3://b/run", "endpoint": "https://minio.internal", "addressingStyle": "virtual"},
     "virtual"),
    ({"uri": "file:///ckpt/run", "addressingStyle": "path"}, None),  # no S3, no style
])
def test_trainer_gets_the_addressing_style_the_job_asked_for(checkpoint, env_style):
    env = _env(checkpoint)
    got = env.get(contract.ENV_S3_ADDRESSING_STYLE, {}).get("value")
    assert got == env_style
    if not checkpoint["uri"].startswith("s3://"):
        return
    # and resolving it in the trainer gives what the operator uses for its own client
    trainer = contract.s3_addressing_style(
        contract.addressing_style_from_env({k: e["value"] for k, e in env.items() if "value" in e}),
        env.get("AWS_ENDPOINT_URL", {}).get("value"))
    spec = JobSpec.parse({"phases": [{"name": "train"}], "checkpoint": checkpoint})
    assert trainer == contract.s3_addressing_style(spec.checkpoint.addressing_style,
                                                   spec.checkpoint.endpoint)


class _Secrets:
    def __init__(self, data):
        self.data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}

    def read_namespaced_secret(self, name, namespace):
        return SimpleNamespace(data=self.data)


def _kube(data: dict) -> Kube:
    kube = Kube(client.ApiClient())
    kube.core = _Secrets(data)
    return kube


def test_the_secret_read_takes_the_token_when_there_is_one():
    keys = _kube({"AWS_ACCESS_KEY_ID": "ASIAX", "AWS_SECRET_ACCESS_KEY": "sk",
                  "AWS_SESSION_TOKEN": TOKEN, "other": "ignored"}).s3_credentials("ns", "c")
    assert (keys.access_key, keys.secret_key, keys.session_token) == ("ASIAX", "sk", TOKEN)
    keys = _kube({"AWS_ACCESS_KEY_ID": "AKIAX", "AWS_SECRET_ACCESS_KEY": "sk"}).s3_credentials(
        "ns", "c")
    assert keys.session_token is None and keys.access_key == "AKIAX"


def _access(checkpoint: dict, secret: dict, **config):
    body = job()
    body["spec"]["checkpoint"] = checkpoint
    reconciler = Reconciler(_kube(secret), OperatorConfig(api_workers=1, **config))
    return asyncio.run(reconciler.gather.storage_access(body))


def test_the_operator_uses_the_jobs_token_and_the_jobs_addressing(caplog):
    secret = {"AWS_ACCESS_KEY_ID": "ASIAX", "AWS_SECRET_ACCESS_KEY": "SECRETKEY",
              "AWS_SESSION_TOKEN": TOKEN}
    with caplog.at_level(logging.DEBUG):
        minio = _access({"uri": "s3://b/run", "credentialsSecret": "c",
                         "endpoint": "http://minio:9000"}, secret)
    assert minio == Credentials(endpoint_url="http://minio:9000", access_key="ASIAX",
                                secret_key="SECRETKEY", session_token=TOKEN,
                                addressing_style="path")
    for text in (caplog.text, repr(minio), str(minio)):
        assert TOKEN not in text and "SECRETKEY" not in text and "ASIAX" not in text
    aws = _access({"uri": "s3://b/run", "credentialsSecret": "c", "region": "eu-west-1"}, secret)
    assert (aws.addressing_style, aws.region, aws.endpoint_url) == ("virtual", "eu-west-1", None)
    forced = _access({"uri": "s3://b/run", "credentialsSecret": "c",
                      "endpoint": "https://minio.internal", "addressingStyle": "virtual"}, secret)
    assert forced.addressing_style == "virtual"
    # the operator's endpoint override is another way to the same server: the job's choice holds
    lab = _access({"uri": "s3://b/run", "credentialsSecret": "c",
                   "endpoint": "http://minio.svc:9000"}, secret,
                  s3_endpoint_override="http://127.0.0.1:9000")
    assert (lab.endpoint_url, lab.addressing_style) == ("http://127.0.0.1:9000", "path")


def test_the_own_identity_gets_no_keys_but_the_same_addressing():
    own = _access({"uri": "s3://shared/teamX/run"}, {},
                  own_identity_prefixes=("s3://shared/teamX/",))
    assert (own.access_key, own.secret_key, own.session_token) == (None, None, None)
    assert own.addressing_style == "virtual"


def _checkpoint_schema() -> dict:
    crd = yaml.safe_load((REPO / "crds" / "phoenixjobs.yaml").read_text())
    return (crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["checkpoint"])


def test_the_crd_offers_exactly_the_styles_the_contract_knows():
    field = _checkpoint_schema()["properties"]["addressingStyle"]
    assert field["enum"] == list(contract.ADDRESSING_STYLES)
    assert field["default"] == contract.ADDRESSING_AUTO
    assert JobSpec.parse({"phases": [], "checkpoint": {"uri": "s3://b"}}).checkpoint \
        .addressing_style == contract.ADDRESSING_AUTO


def test_the_addressing_style_of_a_job_is_immutable_like_its_endpoint():
    rules = [r["rule"] for r in _checkpoint_schema()["x-kubernetes-validations"]
             if "oldSelf" in r["rule"]]
    assert any("self.endpoint" in r and "oldSelf.addressingStyle" in r for r in rules)


def test_the_session_token_name_lives_in_the_contract():
    assert contract.ENV_AWS_SESSION_TOKEN == "AWS_SESSION_TOKEN"
    text = (REPO / "operator" / "phoenix_operator" / "podspec.py").read_text()
    assert '"AWS_SESSION_TOKEN"' not in text


def _pod(checkpoint: dict, template_spec: dict | None = None) -> dict:
    from phoenix_operator.podspec import build_pod

    body = job()
    body["spec"]["checkpoint"] = checkpoint
    if template_spec:
        body["spec"]["template"]["spec"].update(template_spec)
    spec = JobSpec.parse(body["spec"])
    return build_pod(job="j", namespace="ns", spec=spec, phase=spec.phases[0], attempt=1,
                     resume_from=None, resume_step=None, init_from=None)


def test_a_ca_bundle_is_mounted_read_only_into_the_trainer_and_named_for_boto3():
    pod = _pod({"uri": "s3://b/run", "endpoint": "https://minio.internal",
                "caBundle": {"configMap": "internal-ca"}},
               {"containers": [{"name": "trainer", "image": "img"},
                               {"name": "sidecar", "image": "img"}],
                "volumes": [{"name": "data", "emptyDir": {}}]})
    trainer, sidecar = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["AWS_CA_BUNDLE"] == "/etc/phoenix/ca/ca.crt"  # key defaults to ca.crt
    assert trainer["volumeMounts"] == [{"name": "phoenix-ca-bundle",
                                        "mountPath": "/etc/phoenix/ca", "readOnly": True}]
    assert "volumeMounts" not in sidecar and "env" not in sidecar
    assert pod["spec"]["volumes"] == [
        {"name": "data", "emptyDir": {}},
        {"name": "phoenix-ca-bundle", "configMap": {
            "name": "internal-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]
    keyed = _pod({"uri": "s3://b/run", "caBundle": {"configMap": "ca", "key": "root.pem"}})
    env = {e["name"]: e.get("value") for e in keyed["spec"]["containers"][0]["env"]}
    assert env["AWS_CA_BUNDLE"] == "/etc/phoenix/ca/root.pem"
    plain = _pod({"uri": "s3://b/run"})
    assert "volumes" not in plain["spec"] and "AWS_CA_BUNDLE" not in {
        e["name"] for e in plain["spec"]["containers"][0]["env"]}


def test_a_ca_bundle_from_a_secret_is_mounted_read_only_in_its_place():
    pod = _pod({"uri": "s3://b/run", "endpoint": "https://minio.internal",
                "caBundle": {"secret": "internal-ca-secret", "key": "bundle.pem"}})
    trainer = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["AWS_CA_BUNDLE"] == "/etc/phoenix/ca/bundle.pem"
    assert trainer["volumeMounts"] == [{"name": "phoenix-ca-bundle",
                                        "mountPath": "/etc/phoenix/ca", "readOnly": True}]
    assert pod["spec"]["volumes"] == [{"name": "phoenix-ca-bundle", "secret": {
        "secretName": "internal-ca-secret",
        "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}}]
    defaulted = _pod({"uri": "s3://b/run", "caBundle": {"secret": "s"}})
    env = {e["name"]: e.get("value") for e in defaulted["spec"]["containers"][0]["env"]}
    assert env["AWS_CA_BUNDLE"] == "/etc/phoenix/ca/ca.crt"


def test_the_crd_ca_bundle_needs_exactly_one_source_and_defaults_its_key():
    field = _checkpoint_schema()["properties"]["caBundle"]
    assert "required" not in field
    assert set(field["properties"]) == {"configMap", "secret", "key"}
    [rule] = field["x-kubernetes-validations"]
    assert rule["rule"] == "has(self.configMap) != has(self.secret)"
    assert "spec.checkpoint.caBundle" in rule["message"]
    assert field["properties"]["key"]["default"] == "ca.crt"
