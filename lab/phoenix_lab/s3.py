"""Real S3 servers: versitygw with its posix backend (``S3Server``), and SeaweedFS
(``SeaweedS3Server``), a second, independent implementation served over TLS with a lab CA
(and, on loopback, with virtual-hosted bucket names).

Both serve the storage tests on loopback. In a lab cluster both listen on the lab's host
address, where pods reach them (``Lab.s3_server_for``): versitygw is the lab's checkpoint
store (the demo, cluster and e2e tests), SeaweedFS is started there on demand for the
cluster and e2e tests that run against it. Credentials are generated per state dir and
never logged.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .certs import PKI
from .procs import LabError, Service, free_port, require_free_port, tcp_ready


# The lab's S3 servers, by the name a test's id carries; the first is the default.
SERVER_NAMES = ("versitygw", "seaweedfs")


def servers_wanted(spec: str | None) -> list[str]:
    """The servers a comma-separated list names (``PHOENIX_S3_SERVERS``), in its order;
    None or blank: all of them. An unknown or empty list is an error naming the choices."""
    if spec is None or not spec.strip():
        return list(SERVER_NAMES)
    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(SERVER_NAMES))
    if unknown or not wanted:
        raise ValueError(f"unknown S3 server(s) {unknown or 'none given'}; "
                         f"choose from {', '.join(SERVER_NAMES)}")
    return list(dict.fromkeys(wanted))


@dataclass(frozen=True)
class S3Endpoint:
    """How to reach the lab's S3 server. ``repr`` hides the secret key."""

    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    name: str = "versitygw"  # which server: a storage test's id names it
    ca_bundle: str | None = None  # PEM file of the lab CA that signed an https:// endpoint
    # an endpoint for virtual-hosted requests (https://s3.localhost:PORT): bucket B is then
    # B.s3.localhost, which resolves only where /etc/hosts says so (see ``hosts_line``)
    virtual_url: str | None = None

    def __repr__(self) -> str:  # never print credentials
        return f"S3Endpoint({self.name}, url={self.url!r}, access_key=***, secret_key=***)"

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
            verify=self.ca_bundle,
        )

    def env(self) -> dict[str, str]:
        """The environment a boto3 program needs to reach this server."""
        out = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }
        if self.ca_bundle:
            out["AWS_CA_BUNDLE"] = self.ca_bundle
        return out


class _Served:
    """What both lab S3 servers share: a ``service`` (procs.Service) and an ``endpoint``."""

    def stop(self) -> None:
        self.service.stop()

    def running(self) -> bool:
        return self.service.running()

    def ensure_bucket(self, name: str) -> None:
        client = self.endpoint.client()
        try:
            client.head_bucket(Bucket=name)
        except client.exceptions.ClientError:
            client.create_bucket(Bucket=name)


class S3Server(_Served):
    def __init__(self, state_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.state_dir = Path(state_dir)
        self.data_dir = self.state_dir / "s3-data"
        creds = self.state_dir / "s3-credentials"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if creds.exists():
            access, secret, saved_port = creds.read_text().split()
            port = port or int(saved_port)
        else:
            access, secret = "phx" + secrets.token_hex(6), secrets.token_urlsafe(24)
            port = port or free_port()
            creds.touch(mode=0o600)
            creds.write_text(f"{access} {secret} {port}\n")
        self.port = port
        self.host = host
        self.endpoint = S3Endpoint(f"http://{host}:{port}", access, secret)
        self.service = Service(
            name="s3",
            argv=[str(paths.binary("versitygw")), "--port", f"{host}:{port}", "posix",
                  str(self.data_dir)],
            # Credentials go through the environment, not argv, so `ps` does not show them.
            env={"ROOT_ACCESS_KEY": access, "ROOT_SECRET_KEY": secret},
            state_dir=self.state_dir,
            ready=tcp_ready(port, host),
        )

    def start(self) -> S3Endpoint:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.service.running():
            require_free_port(self.port, "the S3 server", self.host)
        self.service.start(timeout=30)
        return self.endpoint


SEAWEED_DOMAIN = "s3.localhost"  # virtual-hosted names: <bucket>.s3.localhost


def seaweed_cert_ips(host: str) -> tuple[str, ...]:
    """The addresses SeaweedFS's certificate names besides 127.0.0.1 (which every lab
    serving certificate names): ``host``, where it listens."""
    return () if host == "127.0.0.1" else (host,)


def seaweed_endpoint(host: str, port: int, access: str, secret: str, ca_bundle: str) -> S3Endpoint:
    """How clients reach a SeaweedFS on ``host``: on loopback by the name ``localhost`` (and
    virtual-hosted through ``SEAWEED_DOMAIN``), elsewhere (a lab's host address, which pods
    reach) by that address, which its certificate names; path-style only there, as no
    name resolves to it."""
    if host == "127.0.0.1":
        return S3Endpoint(f"https://localhost:{port}", access, secret, name="seaweedfs",
                          ca_bundle=ca_bundle, virtual_url=f"https://{SEAWEED_DOMAIN}:{port}")
    return S3Endpoint(f"https://{host}:{port}", access, secret, name="seaweedfs",
                      ca_bundle=ca_bundle)


class SeaweedS3Server(_Served):
    """SeaweedFS (``weed mini``: master, volume server, filer and S3 gateway in one process),
    every port free and bound to ``host`` only, its S3 port TLS-only with a certificate from
    ``pki``'s CA (default: a CA made in the state dir) that names ``host``.

    On loopback (the storage tests) it answers path-style requests on
    ``https://localhost:PORT`` and virtual-hosted ones for ``<bucket>.s3.localhost`` (the
    certificate names ``*.s3.localhost``); nothing here makes that name resolve, see
    ``S3Endpoint.virtual_url``. On a lab's host address (``Lab.s3_server_for``) pods reach it
    at ``https://HOST:PORT``, path-style. Telemetry, WebDAV, the admin UI and the
    Iceberg/Lance catalogs are off: nothing leaves the machine."""

    def __init__(self, state_dir: Path, host: str = "127.0.0.1", pki: PKI | None = None) -> None:
        from .certs import ensure_ca, ensure_server_cert

        self.state_dir = Path(state_dir)
        self.host = host
        self.data_dir = self.state_dir / "weed-data"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        settings = self.state_dir / "weed-settings.json"
        if settings.exists():
            saved = json.loads(settings.read_text())
        else:
            saved = {"access": "phx" + secrets.token_hex(6), "secret": secrets.token_urlsafe(24),
                     "ports": {k: free_port() for k in (
                         "s3", "s3grpc", "master", "mastergrpc", "volume", "volumegrpc",
                         "filer", "filergrpc")}}
            settings.touch(mode=0o600)
            settings.write_text(json.dumps(saved))
        ports = self.ports = saved["ports"]
        # `weed` is given s3.crt and s3.key: under other file names its TLS set-up hung.
        pki = ensure_server_cert(pki or ensure_ca(self.state_dir / "pki"), "s3",
                                 ("localhost", SEAWEED_DOMAIN, f"*.{SEAWEED_DOMAIN}"),
                                 server_ips=seaweed_cert_ips(host))
        self.pki = pki
        identities = self.state_dir / "weed-s3.json"
        if not identities.exists():
            identities.touch(mode=0o600)
            identities.write_text(json.dumps({"identities": [{
                "name": "phoenix-tests",
                "credentials": [{"accessKey": saved["access"], "secretKey": saved["secret"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.endpoint = seaweed_endpoint(host, ports["s3"], saved["access"], saved["secret"],
                                         str(pki.ca_cert))
        run = self.state_dir / "run"
        self.service = Service(
            name="seaweedfs",
            argv=[str(paths.binary("weed")), "mini",
                  f"-dir={self.data_dir}", f"-ip={host}", f"-ip.bind={host}",
                  f"-master.port={ports['master']}", f"-master.port.grpc={ports['mastergrpc']}",
                  "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
                  f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volumegrpc']}",
                  f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filergrpc']}",
                  f"-filer.localSocket={run}/filer.sock",
                  f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3grpc']}",
                  f"-s3.localSocket={run}/s3.sock",
                  "-s3.port.iceberg=0", "-s3.port.lance=0",
                  f"-s3.config={identities}", f"-s3.domainName={SEAWEED_DOMAIN}",
                  f"-s3.cert.file={pki.cert('s3')}", f"-s3.key.file={pki.key('s3')}",
                  "-webdav=false", "-admin.ui=false"],
            state_dir=self.state_dir,
            ready=tcp_ready(ports["s3"], host),
        )

    def start(self) -> S3Endpoint:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.service.running():
            for what, port in self.ports.items():
                require_free_port(port, f"SeaweedFS ({what})", self.host)
        self.service.start(timeout=60)
        self._wait_serving(timeout=60)
        return self.endpoint

    def _wait_serving(self, timeout: float) -> None:
        """The S3 port opens before the filer behind it is reachable: wait for a real
        signed request to succeed."""
        client = self.endpoint.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.list_buckets()
                return
            except Exception as e:  # noqa: BLE001 - not serving yet
                if time.monotonic() > deadline or not self.service.running():
                    raise LabError(f"SeaweedFS does not serve S3 ({e}); its log:\n"
                                   f"{self.service.tail(30)}") from e
                time.sleep(0.5)
