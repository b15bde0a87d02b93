"""An image registry on loopback, for a lab node that pulls its images (opt-in).

The lab's nodes boot from a node image that already holds the project's images
(``nodes.ensure_node_image``); a real spot node that joins the pool pulls the trainer image
first. To measure that, ``Registry`` runs the distribution project's ``registry`` (built by
``lab/build-binaries.sh registry``) on 127.0.0.1 with its storage in a directory of its own,
``push`` copies an image from the lab's dockerd into it (docker treats a loopback registry
as insecure, plain HTTP, by default), and ``hosts_toml`` is the containerd registry host
config (``config_path``) a *cold* node uses to pull from it (``Lab.add_cold_node``). The
containerds run on the host, so loopback reaches the registry; no pod talks to it.

``Lab.up`` never starts one: ``benchmarks/bench_cold_pull.py`` does, and removes its storage
(GBs) when it stops.
"""
from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path

from . import images, paths
from .procs import Service, free_port


def hosts_toml(address: str) -> str:
    """containerd's hosts.toml for ``address`` (``host:port``): plain HTTP to it, and only
    to it (no fallback to any other host)."""
    return (f'server = "http://{address}"\n\n'
            f'[host."http://{address}"]\n'
            '  capabilities = ["pull", "resolve"]\n')


class Registry:
    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.dir = Path(state_dir)
        self.port = port or free_port()
        self.storage = self.dir / "storage"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def service(self) -> Service:
        return Service(name="registry", state_dir=self.dir,
                       argv=[str(paths.binary("registry")), "serve", str(self.dir / "config.yml")],
                       ready=self._ready)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yml").write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n")
        self.service.start(timeout=30)

    def push(self, ref: str) -> tuple[str, float]:
        """Push the lab's image ``ref`` (a short name) into the registry; its reference
        there and the seconds the push took (compressing every layer)."""
        remote = f"{self.address}/{ref}"
        images.docker("tag", ref, remote)
        t0 = time.monotonic()
        try:
            images.docker("push", remote, timeout=3600)
        finally:
            images.docker("rmi", remote, check=False)  # the tag only; the image stays
        return remote, time.monotonic() - t0

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.storage.rglob("*") if f.is_file())

    def stop(self) -> None:
        """Stop it and remove its storage."""
        self.service.stop()
        shutil.rmtree(self.storage, ignore_errors=True)
