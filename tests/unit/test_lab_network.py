"""The lab's address plan and node configs keep traffic on the machine (pure, no root)."""
from __future__ import annotations

import ipaddress

import pytest

from phoenix_lab.network import LabNetwork
from phoenix_lab.nodes import NodeSpec, _same_image, containerd_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("index", [0, 1, 7])
def test_slices_of_different_labs_never_overlap(index):
    a, b = LabNetwork(index), LabNetwork(index + 1)
    for x, y in ((a.pod_range, b.pod_range), (a.service_range, b.service_range),
                 (a.pod_range, a.service_range)):
        assert not ipaddress.ip_network(x).overlaps(ipaddress.ip_network(y))
    assert a.contains(a.host_ip) and a.contains(a.gateway(3))
    assert not b.contains(a.host_ip)


def test_pod_network_routes_only_the_lab_range_and_never_enables_forwarding():
    net = LabNetwork(0)
    cni = net.cni_config("lab-spot-1", 1, "/tmp/ipam")
    bridge = cni["plugins"][0]
    # isGateway/ipMasq would make the bridge plugin switch on the machine-wide ip_forward
    # and masquerade pod traffic out of the uplink.
    assert bridge["isGateway"] is False and bridge["ipMasq"] is False
    routes = bridge["ipam"]["routes"]
    assert routes == [{"dst": net.pod_range, "gw": net.gateway(1)}]
    assert all(r["dst"] not in ("0.0.0.0/0", "default") for r in routes)
    [[rng]] = bridge["ipam"]["ranges"]
    assert ipaddress.ip_network(rng["subnet"]).subnet_of(ipaddress.ip_network(net.pod_range))


def test_bridge_names_fit_the_kernel_limit():
    net = LabNetwork(7)
    for name in (net.bridge(99), net.host_link):
        assert len(name) <= 15  # IFNAMSIZ - 1


def test_spot_nodes_carry_label_and_taint():
    spot, ondemand = NodeSpec("s", 1, spot=True, gpus=4), NodeSpec("o", 0, spot=False, gpus=0)
    assert spot.labels["phoenix.dev/spot"] == "true" and ondemand.labels["phoenix.dev/spot"] == "false"
    assert spot.taints == [{"key": "phoenix.dev/spot", "value": "true", "effect": "NoSchedule"}]
    assert ondemand.taints == []


def test_containerd_config_restricts_oom_score_adj(tmp_path, monkeypatch):
    monkeypatch.setattr("phoenix_lab.nodes._cni_bin_dir", lambda: "/usr/lib/cni")
    text = containerd_config(tmp_path / "root", tmp_path / "state", tmp_path / "c.sock",
                             tmp_path / "cni", "phoenix-pause:1")
    assert "restrict_oom_score_adj = true" in text  # no CAP_SYS_RESOURCE in this sandbox
    assert 'sandbox_image = "phoenix-pause:1"' in text
    assert f'address = "{tmp_path / "c.sock"}"' in text


def test_short_image_names_match_their_normalized_references():
    assert _same_image("some.host/library/phoenix-trainer:abc", "phoenix-trainer:abc")
    assert not _same_image("some.host/library/phoenix-trainer:abc", "phoenix-trainer:abd")


def test_every_bridge_gets_its_own_fixed_locally_administered_mac():
    """A bridge left to the kernel takes its lowest port's MAC and changes it when that pod
    goes, stalling every other pod's traffic through it (network.py)."""
    macs = [LabNetwork(i).bridge_mac(n) for i in (0, 1, 7) for n in (None, 0, 1, 2, 255, 300)]
    assert len(set(macs)) == len(macs)
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert len(mac.split(":")) == 6 and first & 0b10 and not first & 0b01, mac
