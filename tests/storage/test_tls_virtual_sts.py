"""What a real cloud set-up adds to the storage path, against the second S3 server (SeaweedFS:
TLS with a lab CA, virtual-hosted bucket names, STS):

- an https:// endpoint signed by a private CA is reached only through ``AWS_CA_BUNDLE``
  (``spec.checkpoint.caBundle``'s mount, the chart's ``storage.caBundle``);
- ``addressingStyle: virtual`` sends ``<bucket>.<endpoint host>`` requests that the server
  answers, end to end through ``open_storage`` in a separate process whose /etc/hosts names
  the bucket (a private mount namespace: no DNS for it exists here);
- temporary credentials (AssumeRole) with their session token work through both doors Phoenix
  uses: ``Credentials(session_token=...)`` (the operator, from a Secret) and the
  ``AWS_SESSION_TOKEN`` env (the trainer pod), and a wrong token is refused.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import pytest

from phoenix_trainer.core.errors import StorageError
from phoenix_trainer.core.storage import Credentials, open_storage

pytestmark = [pytest.mark.storage,
              # these need what only the second server offers; they reuse its session instance
              pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)]

REPO = Path(__file__).resolve().parents[2]


def _creds(ep, **kw) -> Credentials:
    return Credentials(endpoint_url=ep.url, access_key=ep.access_key, secret_key=ep.secret_key,
                       **kw)


def test_tls_endpoint_is_trusted_through_the_ca_bundle_only(s3_server, s3_bucket, monkeypatch):
    ep = s3_server
    assert ep.url.startswith("https://") and ep.ca_bundle
    assert os.environ["AWS_CA_BUNDLE"] == ep.ca_bundle  # what the pod's env says
    st = open_storage(f"{s3_bucket.uri}/job/train", _creds(ep))
    w = st.open_write("step-1/shard.bin")
    w.write(b"x" * 1000)
    entry = w.commit()
    assert st.get_bytes("step-1/shard.bin") == b"x" * 1000
    assert st.stat("step-1/shard.bin") == (1000, entry.stored_checksum)

    monkeypatch.delenv("AWS_CA_BUNDLE")  # the system's public CAs do not know the lab CA
    untrusted = open_storage(f"{s3_bucket.uri}/job/train", _creds(ep))
    with pytest.raises(StorageError, match="(?i)certificate|ssl"):
        untrusted.get_bytes("step-1/shard.bin")


_VIRTUAL_CLIENT = textwrap.dedent("""
    import json, os, sys
    from phoenix_trainer.core.storage import open_storage

    def _ranged(st):
        buf = bytearray(3)
        st.read_into("step-5/shard-0.bin", (5 << 20) - 1, buf)  # across a part boundary
        return buf

    st = open_storage(sys.argv[1])  # everything else from the pod-style env
    hosts = []
    st.client.meta.events.register(
        "before-send.s3", lambda request, **_: hosts.append(request.url.split("/")[2]))
    st.put_bytes("step-5/manifest.json", b"{}")
    w = st.open_write("step-5/shard-0.bin")  # 2 parts of 5 MiB and a short one
    w.write(b"a" * (11 << 20))
    entry = w.commit()
    out = {"keys": st.list_keys("step-5"), "dirs": st.list_dirs(""),
           "stat": list(st.stat("step-5/shard-0.bin")), "checksum": entry.stored_checksum,
           "ranged": bytes(_ranged(st)).decode(),
           "style": st.client.meta.config.s3["addressing_style"], "hosts": sorted(set(hosts))}
    st.delete("step-5/manifest.json")
    print(json.dumps(out))
""")


def _private_hosts_run(hosts_file: Path, argv: list[str], env: dict[str, str]):
    """``argv`` in a private mount namespace whose /etc/hosts is ``hosts_file`` (root only)."""
    script = f'mount --bind "{hosts_file}" /etc/hosts && exec "$@"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           "sh", *argv], env=env, capture_output=True, text=True, timeout=120)


def test_virtual_hosted_addressing_end_to_end(s3_server, s3_bucket, tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare: a private /etc/hosts names the bucket's host")
    ep = s3_server
    host = urlparse(ep.virtual_url).hostname  # s3.localhost
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(f"127.0.0.1 localhost {host} {s3_bucket.name}.{host}\n")
    env = {**os.environ, **ep.env(), "AWS_ENDPOINT_URL": ep.virtual_url,
           "PHOENIX_S3_ADDRESSING_STYLE": "virtual", "PHOENIX_S3_PART_MB": "5",
           "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("operator", "trainer_image"))}
    done = _private_hosts_run(hosts_file, [sys.executable, "-c", _VIRTUAL_CLIENT,
                                           f"{s3_bucket.uri}/job/train"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    port = urlparse(ep.virtual_url).port
    # every request named the bucket in the host, none in the path
    assert out["style"] == "virtual"
    assert out["hosts"] == [f"{s3_bucket.name}.{host}:{port}"]
    assert out["keys"] == ["step-5/manifest.json", "step-5/shard-0.bin"]
    assert out["dirs"] == ["step-5"]
    assert out["stat"][0] == 11 << 20 and out["stat"][1] == out["checksum"]
    assert out["checksum"].endswith("-3") and out["ranged"] == "aaa"
    # seen the same from outside, path-style on https://localhost
    st = open_storage(f"{s3_bucket.uri}/job/train", _creds(ep))
    assert st.list_keys("step-5") == ["step-5/shard-0.bin"]
    assert st.get_bytes("step-5/shard-0.bin") == b"a" * (11 << 20)


def _assume_role(ep) -> dict:
    """SeaweedFS's STS AssumeRole without a RoleArn: a session for the caller itself (no
    role or trust policy to set up). botocore insists on a RoleArn, hence no client-side
    parameter validation for this one call."""
    import boto3
    from botocore.config import Config

    sts = boto3.client("sts", endpoint_url=ep.url, region_name=ep.region,
                       aws_access_key_id=ep.access_key, aws_secret_access_key=ep.secret_key,
                       verify=ep.ca_bundle, config=Config(parameter_validation=False))
    return sts.assume_role(RoleSessionName="phoenix-trainer", DurationSeconds=900)["Credentials"]


def test_temporary_credentials_with_a_session_token(s3_server, s3_bucket, monkeypatch):
    ep = s3_server
    tmp = _assume_role(ep)
    assert tmp["AccessKeyId"] != ep.access_key and tmp["SessionToken"]
    uri = f"{s3_bucket.uri}/job/train"
    # the operator's door: Credentials from a Secret with AWS_SESSION_TOKEN
    op = open_storage(uri, Credentials(endpoint_url=ep.url, access_key=tmp["AccessKeyId"],
                                       secret_key=tmp["SecretAccessKey"],
                                       session_token=tmp["SessionToken"]))
    op.put_bytes("fence.json", b'{"attempt": 1}')
    assert op.get_bytes("fence.json") == b'{"attempt": 1}'
    assert op.list_keys("") == ["fence.json"]
    # the trainer's door: the pod's env, nothing passed in
    for key, value in {"AWS_ENDPOINT_URL": ep.url, "AWS_ACCESS_KEY_ID": tmp["AccessKeyId"],
                       "AWS_SECRET_ACCESS_KEY": tmp["SecretAccessKey"],
                       "AWS_SESSION_TOKEN": tmp["SessionToken"]}.items():
        monkeypatch.setenv(key, value)
    trainer = open_storage(uri)
    w = trainer.open_write("step-1/shard.bin")
    w.write(b"t" * 4096)
    w.commit()
    assert trainer.get_bytes("fence.json") == b'{"attempt": 1}'
    assert op.get_bytes("step-1/shard.bin") == b"t" * 4096
    # the key pair without its token, or with another token, is refused
    for token in (None, tmp["SessionToken"][:-8] + "AAAAAAAA"):
        bad = open_storage(uri, Credentials(endpoint_url=ep.url, access_key=tmp["AccessKeyId"],
                                            secret_key=tmp["SecretAccessKey"],
                                            session_token=token))
        with pytest.raises(StorageError):
            bad.get_bytes("fence.json")
