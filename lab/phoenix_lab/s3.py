"""A real S3 server on loopback: versitygw with its posix backend.

Used by the lab (the demo's checkpoint store) and by storage tests. Credentials are
generated per state dir and never logged.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .procs import Service, free_port, require_free_port, tcp_ready


@dataclass(frozen=True)
class S3Endpoint:
    """How to reach the lab's S3 server. ``repr`` hides the secret key."""

    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def __repr__(self) -> str:  # never print credentials
        return f"S3Endpoint(url={self.url!r}, access_key=***, secret_key=***)"

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def env(self) -> dict[str, str]:
        """The environment a boto3 program needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


class S3Server:
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
