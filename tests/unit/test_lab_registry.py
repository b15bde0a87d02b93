"""The lab's cold node pulls from the loopback registry and from nowhere else: its containerd
config names the hosts directory, and the hosts.toml there sends pulls of that registry over
plain HTTP to it alone; a node without a registry gets no registry config."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from phoenix_lab import nodes
from phoenix_lab.registry import hosts_toml

pytestmark = pytest.mark.unit


def _config(hosts: Path | None) -> dict:
    text = nodes.containerd_config(Path("/r"), Path("/s"), Path("/s/c.sock"), Path("/cni"),
                                   "phoenix-pause:1", hosts)
    return tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]


def test_a_cold_nodes_containerd_reads_the_hosts_directory():
    cri = _config(Path("/lab/nodes/lab-cold-3/containerd/certs.d"))
    assert cri["registry"] == {"config_path": "/lab/nodes/lab-cold-3/containerd/certs.d"}
    assert cri["sandbox_image"] == "phoenix-pause:1" and cri["restrict_oom_score_adj"]
    assert "registry" not in _config(None)


def test_hosts_toml_pulls_from_the_loopback_registry_only():
    hosts = tomllib.loads(hosts_toml("127.0.0.1:40123"))
    assert hosts["server"] == "http://127.0.0.1:40123"
    assert hosts["host"] == {"http://127.0.0.1:40123": {"capabilities": ["pull", "resolve"]}}


def test_a_node_spec_is_warm_unless_it_names_a_registry():
    assert nodes.NodeSpec("lab-spot-1", 1, spot=True, gpus=1).registry is None
    cold = nodes.NodeSpec("lab-cold-3", 3, spot=True, gpus=1, registry="127.0.0.1:40123")
    assert cold.labels == {nodes.SPOT_LABEL: "true", nodes.LAB_LABEL: "true"}
