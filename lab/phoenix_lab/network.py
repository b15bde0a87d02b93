"""The lab's host network: addresses, bridges and the rules that keep every packet local.

Each lab owns one numbered slice of address space (``net_index`` i):

- the *host address* ``10.(244+i).255.1`` on a port-less bridge ``phx<i>host``: the
  apiserver, the S3 server and CoreDNS listen there, so host tools and pods reach them at
  one address (pods cannot reach the host's 127.0.0.1 from their own network namespace);
- one bridge ``phx<i>br<n>`` per node with gateway ``10.(244+i).<n>.1/24`` (the kubelet's
  node IP) and that /24 as the node's pod range;
- the service range ``10.(96+i).0.0/16``, blackholed on the host, so a cluster IP nothing
  serves goes nowhere (the lab runs no kube-proxy: two labs on one machine would fight
  over the same iptables chains; in-cluster clients are pointed at the host address).

Every lab bridge gets a fixed MAC address (``bridge_mac``). Left alone, a Linux bridge takes
the lowest MAC among its ports, so deleting the pod whose veth held it changes the gateway's
MAC under every other pod of that node: their cached neighbour entry points nowhere and their
traffic to the host (S3, the apiserver) and to other nodes' pods is dropped until it expires
and is resolved again, tens of seconds. That stalled gang members' storage writes and
collectives whenever a neighbouring pod ended.

What keeps traffic on the machine: pods get routes for the lab's own /16 only (no default
route), forwarding is enabled per lab bridge only (never the global ``ip_forward``), and
a lab-owned iptables chain drops anything forwarded to or from the lab range that does not
stay inside it. No masquerading. ``down()`` removes every interface, route and rule.

Never: touch the uplink, enable global forwarding, or add NAT.
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import LabError

MAX_LABS = 8
# Who holds each slice: a file per slice naming the owning lab's state dir.
OWNERS = Path("/run/phoenix-lab")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def link_exists(name: str) -> bool:
    return _run("ip", "link", "show", name, check=False).returncode == 0


def slice_owner(index: int) -> tuple[Path, int] | None:
    """The state dir of the lab holding a slice and the pid of the process that claimed it."""
    try:
        owner, pid = (OWNERS / f"slice-{index}").read_text().split("\n")[:2]
        return Path(owner), int(pid)
    except (OSError, ValueError):
        return None


def labs_running() -> list[int]:
    """The slices whose host address exists: labs up on this machine."""
    return [i for i in range(MAX_LABS) if link_exists(LabNetwork(i).host_link)]


def claim_net_index(owner: Path, start: int = 1) -> int:
    """Claim the first lab slice no other lab on this machine holds (0 is the developer's
    lab) by creating its host link: atomic, so two test sessions starting at once never
    get the same slice. ``owner`` (the lab's state dir) is recorded for `slice_owner`."""
    for i in range(start, MAX_LABS):
        if _run("ip", "link", "add", LabNetwork(i).host_link, "type", "bridge",
                check=False).returncode == 0:
            OWNERS.mkdir(parents=True, exist_ok=True)
            (OWNERS / f"slice-{i}").write_text(f"{owner}\n{os.getpid()}\n")
            return i
    raise LabError(f"all {MAX_LABS} lab network slices are in use; stop a lab with "
                   "'phoenix-lab down' (ip -br link | grep phx)")


def _pin_mac(link: str, mac: str) -> None:
    """Give a bridge a MAC of its own (the kernel then never replaces it by a port's)."""
    try:
        current = Path(f"/sys/class/net/{link}/address").read_text().strip()
        assigned = Path(f"/sys/class/net/{link}/addr_assign_type").read_text().strip()
    except OSError:
        current, assigned = "", ""
    if current != mac or assigned != "3":  # 3: NET_ADDR_SET, chosen by a user
        _run("ip", "link", "set", "dev", link, "address", mac)


@dataclass(frozen=True)
class LabNetwork:
    index: int

    @property
    def prefix(self) -> str:
        return f"10.{244 + self.index}"

    @property
    def pod_range(self) -> str:
        return f"{self.prefix}.0.0/16"

    @property
    def service_range(self) -> str:
        return f"10.{96 + self.index}.0.0/16"

    @property
    def host_ip(self) -> str:
        return f"{self.prefix}.255.1"

    @property
    def host_link(self) -> str:
        return f"phx{self.index}host"

    @property
    def chain(self) -> str:
        return f"PHOENIX-LAB-{self.index}"

    def bridge(self, node_index: int) -> str:
        return f"phx{self.index}br{node_index}"

    def bridge_mac(self, node_index: int | None) -> str:
        """The fixed MAC of a node's bridge (``None``: the host bridge): locally administered
        unicast, one per lab slice and node."""
        n = 0xFFFF if node_index is None else node_index
        return f"02:50:58:{self.index:02x}:{n >> 8:02x}:{n & 0xFF:02x}"

    def gateway(self, node_index: int) -> str:
        return f"{self.prefix}.{node_index}.1"

    def node_subnet(self, node_index: int) -> str:
        return f"{self.prefix}.{node_index}.0/24"

    def contains(self, address: str) -> bool:
        return ipaddress.ip_address(address) in ipaddress.ip_network(self.pod_range)

    # ---- lifecycle -------------------------------------------------------------------------
    def up(self) -> None:
        if not link_exists(self.host_link):
            _run("ip", "link", "add", self.host_link, "type", "bridge")  # no dummy module here
        _pin_mac(self.host_link, self.bridge_mac(None))
        if f" {self.host_ip}/32 " not in _run("ip", "-o", "addr", "show", "dev",
                                              self.host_link).stdout:
            _run("ip", "addr", "add", f"{self.host_ip}/32", "dev", self.host_link)
        _run("ip", "link", "set", self.host_link, "up")
        if f"blackhole {self.service_range}" not in _run("ip", "route", "show", "type",
                                                            "blackhole").stdout:
            _run("ip", "route", "add", "blackhole", self.service_range)
        if _run("iptables", "-n", "-L", self.chain, check=False).returncode != 0:
            _run("iptables", "-N", self.chain)
        _run("iptables", "-F", self.chain)
        r = self.pod_range
        for rule in (["-s", r, "-d", r, "-j", "ACCEPT"], ["-s", r, "-j", "DROP"],
                     ["-d", r, "-j", "DROP"]):
            _run("iptables", "-A", self.chain, *rule)
        if _run("iptables", "-C", "FORWARD", "-j", self.chain, check=False).returncode != 0:
            _run("iptables", "-I", "FORWARD", "1", "-j", self.chain)

    def add_bridge(self, node_index: int) -> str:
        """The node's bridge with its gateway address; forwarding on for it alone."""
        name = self.bridge(node_index)
        if not link_exists(name):
            _run("ip", "link", "add", name, "type", "bridge")
            _run("ip", "addr", "add", f"{self.gateway(node_index)}/24", "dev", name)
        _pin_mac(name, self.bridge_mac(node_index))  # also on a bridge made before this rule
        _run("ip", "link", "set", name, "up")
        _run("sysctl", "-q", "-w", f"net.ipv4.conf.{name}.forwarding=1")
        return name

    def bridges(self) -> list[str]:
        out = _run("ip", "-o", "link", "show", "type", "bridge", check=False).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                 if ":" in line]
        return [n for n in names if n.startswith(f"phx{self.index}br")]

    def down(self) -> None:
        for name in self.bridges():
            _run("ip", "link", "del", name, check=False)
        _run("ip", "link", "del", self.host_link, check=False)
        _run("ip", "route", "del", "blackhole", self.service_range, check=False)
        while _run("iptables", "-D", "FORWARD", "-j", self.chain, check=False).returncode == 0:
            pass
        _run("iptables", "-F", self.chain, check=False)
        _run("iptables", "-X", self.chain, check=False)
        (OWNERS / f"slice-{self.index}").unlink(missing_ok=True)

    def cni_config(self, node_name: str, node_index: int, ipam_dir: str) -> dict:
        """A bridge network whose pods can only route to the lab's own range."""
        return {
            "cniVersion": "1.0.0", "name": f"phoenix-{node_name}",
            "plugins": [{
                # isGateway would make the plugin switch on the machine-wide ip_forward;
                # the bridge already has its gateway address and forwards on its own.
                "type": "bridge", "bridge": self.bridge(node_index), "isGateway": False,
                "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": ipam_dir,
                         "ranges": [[{"subnet": self.node_subnet(node_index),
                                      "gateway": self.gateway(node_index)}]],
                         "routes": [{"dst": self.pod_range, "gw": self.gateway(node_index)}]},
            }],
        }
