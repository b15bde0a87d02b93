"""How the S3 client is built (issue 29): the addressing style, decided once
(``contract.s3_addressing_style``) for the operator's client and the trainer's, and temporary
credentials (a session token) that reach the request signer but never a log line."""
from __future__ import annotations

import logging

import pytest

from phoenix_trainer.core.contract import (
    ENV_AWS_ENDPOINT_URL, ENV_S3_ADDRESSING_STYLE, TrainerEnv, addressing_style_from_env,
    s3_addressing_style,
)
from phoenix_trainer.core.storage import Credentials, open_storage
from phoenix_trainer.core.storage.s3 import client_addressing_style

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("requested,endpoint,style", [
    (None, None, "virtual"),  # AWS: virtual-hosted, as AWS asks
    ("auto", None, "virtual"),
    (None, "http://minio:9000", "path"),  # an S3-compatible server: path-style
    ("auto", "https://ceph.internal", "path"),
    ("path", None, "path"),  # asked for: taken as asked
    ("virtual", "https://minio.internal", "virtual"),  # a server with per-bucket DNS
    (" Path ", None, "path"),
])
def test_addressing_style_decision(requested, endpoint, style):
    assert s3_addressing_style(requested, endpoint) == style


def test_an_unknown_addressing_style_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="'dns'.*auto, path, virtual"):
        s3_addressing_style("dns", None)


def test_the_trainer_parses_the_style_once_at_the_edge():
    assert addressing_style_from_env({}) == "auto"
    assert TrainerEnv.from_env({}).s3_addressing_style == "auto"
    assert TrainerEnv.from_env({ENV_S3_ADDRESSING_STYLE: "virtual"}).s3_addressing_style == \
        "virtual"
    with pytest.raises(ValueError, match=ENV_S3_ADDRESSING_STYLE):
        TrainerEnv.from_env({ENV_S3_ADDRESSING_STYLE: "vhost"})


@pytest.mark.parametrize("requested,endpoint,environ,style", [
    # the trainer: nothing passed, so its env decides - the endpoint boto3 will read itself
    (None, None, {ENV_AWS_ENDPOINT_URL: "http://minio:9000"}, "path"),
    (None, None, {}, "virtual"),
    (None, None, {ENV_AWS_ENDPOINT_URL: "http://minio:9000", ENV_S3_ADDRESSING_STYLE: "virtual"},
     "virtual"),
    # the operator: the style it resolved for the job is passed and wins over its own env
    ("path", None, {ENV_S3_ADDRESSING_STYLE: "virtual"}, "path"),
    ("auto", "http://minio:9000", {}, "path"),
])
def test_client_style_comes_from_the_caller_or_the_trainers_env(requested, endpoint, environ,
                                                                 style):
    assert client_addressing_style(requested, endpoint, environ) == style


def _url(storage) -> str:
    """Where a GET of ``key`` goes (built by botocore, no request sent)."""
    return storage.client.generate_presigned_url(
        "get_object", Params={"Bucket": storage.bucket, "Key": "run/x"}, ExpiresIn=60)


def test_clients_address_aws_virtual_hosted_and_a_custom_endpoint_path_style(monkeypatch):
    monkeypatch.delenv(ENV_AWS_ENDPOINT_URL, raising=False)
    monkeypatch.delenv(ENV_S3_ADDRESSING_STYLE, raising=False)
    keys = dict(access_key="AKIAEXAMPLE", secret_key="s3cr3t")
    aws = open_storage("s3://my-bucket/run", Credentials(region="eu-west-1", **keys))
    assert _url(aws).startswith("https://my-bucket.s3.")
    minio = open_storage("s3://my-bucket/run", Credentials(endpoint_url="http://minio:9000",
                                                           **keys))
    assert _url(minio).startswith("http://minio:9000/my-bucket/run/x")
    forced = open_storage("s3://my-bucket/run", Credentials(
        endpoint_url="https://s3.example.internal", addressing_style="virtual", **keys))
    assert _url(forced).startswith("https://my-bucket.s3.example.internal/run/x")
    path_on_aws = open_storage("s3://my-bucket/run", Credentials(addressing_style="path",
                                                                 region="us-east-1", **keys))
    assert "/my-bucket/run/x" in _url(path_on_aws)


def test_a_session_token_reaches_the_signer(monkeypatch):
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    storage = open_storage("s3://b/run", Credentials(
        endpoint_url="http://s3:9000", access_key="ASIAEXAMPLE", secret_key="s3cr3t",
        session_token="FwoGZXIvYXdzEXAMPLETOKEN"))
    frozen = storage.client._request_signer._credentials.get_frozen_credentials()
    assert frozen.token == "FwoGZXIvYXdzEXAMPLETOKEN"
    assert "x-amz-security-token=fwogzxivyxdzexampletoken" in _url(storage).lower()
    # keys without a token: none sent (long-lived keys in a Secret keep working)
    plain = open_storage("s3://b/run", Credentials(
        endpoint_url="http://s3:9000", access_key="AKIAEXAMPLE", secret_key="s3cr3t"))
    assert plain.client._request_signer._credentials.get_frozen_credentials().token is None


def test_credentials_never_print_the_keys_or_the_token(caplog):
    creds = Credentials(endpoint_url="http://s3", access_key="AKIA-x", secret_key="s3cr3t",
                        session_token="t0k3n", region="eu-west-1", addressing_style="path")
    with caplog.at_level(logging.INFO):
        logging.getLogger("phoenix.test").info("opening %s / %r / %s", creds, creds,
                                               f"{creds} {[creds]}")
    for text in (repr(creds), str(creds), caplog.text):
        assert "http://s3" in text and "path" in text
        assert "AKIA-x" not in text and "s3cr3t" not in text and "t0k3n" not in text


class _EmptyBody:
    def stream(self, **_):
        yield b""


@pytest.mark.parametrize("setting,signed", [(None, False), ("1", True), ("0", False)])
def test_request_bodies_are_bound_by_a_signed_checksum_header_not_a_signed_body(
        monkeypatch, setting, signed):
    """A part goes out with its SHA-256 in a signed header and, unless
    PHOENIX_S3_SIGN_PAYLOAD=1, an unsigned body, also over plain HTTP (botocore would hash
    every byte once more to sign it). The request is stopped before it is sent."""
    from botocore.awsrequest import AWSResponse

    from phoenix_trainer.core.storage.s3 import S3Storage

    if setting is None:
        monkeypatch.delenv("PHOENIX_S3_SIGN_PAYLOAD", raising=False)
    else:
        monkeypatch.setenv("PHOENIX_S3_SIGN_PAYLOAD", setting)
    storage = S3Storage("b", "p", endpoint_url="http://127.0.0.1:9", access_key="AKIDEXAMPLE",
                        secret_key="not-a-secret", region="us-east-1")
    sent = []

    def stop(request, **_):
        sent.append(request)
        return AWSResponse(request.url, 200, {"ETag": '"x"'}, _EmptyBody())

    storage.client.meta.events.register("before-send.s3.UploadPart", stop)
    storage.client.upload_part(Bucket="b", Key="p/k", UploadId="u", PartNumber=1, Body=b"abc",
                               ChecksumSHA256="ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=")
    (req,) = sent
    auth = req.headers["Authorization"].decode() if isinstance(req.headers["Authorization"], bytes) \
        else req.headers["Authorization"]
    assert "x-amz-checksum-sha256" in auth.split("SignedHeaders=")[1]
    body_sha = req.headers["X-Amz-Content-SHA256"]
    body_sha = body_sha.decode() if isinstance(body_sha, bytes) else body_sha
    if signed:
        assert body_sha == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    else:
        assert body_sha == "UNSIGNED-PAYLOAD"
