"""The lab's nodes: one real kubelet + containerd + CNI bridge per node, on this machine.

A node is a directory under the lab's state dir (``nodes/<name>/``) holding its
containerd root and state, its CNI config and IPAM leases, and the kubelet's root dir and
pod logs, plus two processes: ``containerd`` (own socket) and ``kubelet`` (own node
credentials ``system:node:<name>``, node IP = its bridge's gateway). Spot nodes carry the
``phoenix.dev/spot=true`` label and taint; GPU capacity is advertised the documented way
for extended resources (a status patch of ``capacity``).

Images come from a *node image*: a containerd root, prepared once per set of image IDs
under the cache, into which the project's images were imported. A node starts from a
hard-linked copy of it (only the two bolt databases are copied for real), as cloud GPU
nodes boot from node images with their images pre-pulled: seconds, not the minutes and
gigabytes a per-node ``ctr import`` of the trainer image costs.

Node loss (``Node.kill``) SIGKILLs the kubelet, containerd, every shim and every container
process of that node at once: the node says nothing. ``Node.cleanup`` unmounts and removes
what is left (rootfs mounts, volume tmpfs, network namespaces), also after a crash.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from . import paths
from .network import LabNetwork
from .procs import LabError, Service
from .registry import hosts_toml

SPOT_LABEL = "phoenix.dev/spot"
LAB_LABEL = "phoenix.dev/lab"
GPU = "nvidia.com/gpu"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
# The databases containerd rewrites in place; everything else in a root is immutable
# content (blobs, unpacked layers) and safe to share by hard link.
_BOLT_DBS = ("io.containerd.metadata.v1.bolt/meta.db",
             "io.containerd.snapshotter.v1.overlayfs/metadata.db")


def _cni_bin_dir() -> str:
    for d in CNI_BIN_DIRS:
        if Path(d, "bridge").exists():
            return d
    raise LabError("CNI plugins not found (install Debian's containernetworking-plugins)")


def containerd_config(root: Path, state: Path, socket: Path, cni_conf_dir: Path,
                      pause_image: str, registry_hosts: Path | None = None) -> str:
    """containerd 1.6 config for one node; settings from LAB-NOTES ("Real nodes").
    ``registry_hosts``: a ``config_path`` directory of hosts.toml files (a cold node's, for
    the lab's registry: ``registry.py``)."""
    registry = (f"""  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{registry_hosts}"
""" if registry_hosts else "")
    return f"""version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  # The sandbox lacks CAP_SYS_RESOURCE: containers may not lower oom_score_adj.
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{_cni_bin_dir()}"
    conf_dir = "{cni_conf_dir}"
{registry}"""


def ctr(socket: Path, *args: str, check: bool = True,
        timeout: float = 900) -> subprocess.CompletedProcess:
    argv = ["ctr", "--address", str(socket), "--namespace", "k8s.io", *args]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def _containerd_service(name: str, node_dir: Path, config: str) -> Service:
    (node_dir / "containerd").mkdir(parents=True, exist_ok=True)
    conf = node_dir / "containerd" / "config.toml"
    conf.write_text(config)
    socket = node_dir / "containerd" / "containerd.sock"
    return Service(name=f"containerd-{name}", state_dir=node_dir,
                   argv=["containerd", "--config", str(conf)],
                   ready=lambda: socket.exists() and ctr(socket, "version", check=False).returncode == 0)


# ---- the node image ----------------------------------------------------------------------
KEEP_NODE_IMAGES = 3


def node_image_root(stamp: str) -> Path:
    """The node image for one set of images (``stamp``): ``<cache>/node-image/<stamp>/root``."""
    return paths.cache_dir() / "node-image" / stamp / "root"


def ensure_node_image(images: list[str], stamp: str, save: Callable[[str], Path],
                      progress) -> Path:
    """A containerd root holding ``images`` (short references), for nodes to boot from.

    One per set of images (``stamp``, from their IDs), so a lab keeps booting replacement
    nodes with its own images while another lab on this machine moved on; the newest
    ``KEEP_NODE_IMAGES`` are kept. A new one starts as a hard-linked copy of the newest
    existing one, so importing only unpacks changed layers. ``save(ref)`` gives a `docker
    save` tar of an image; it is deleted once imported.
    """
    base = paths.cache_dir() / "node-image"
    root = node_image_root(stamp)
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root.parent / "ready").exists():
            return root
        progress("preparing the node image (a containerd root with the lab's images)")
        shutil.rmtree(root.parent, ignore_errors=True)
        ready = sorted((p.parent for p in base.glob("*/ready")), key=lambda d: d.stat().st_mtime)
        if ready:
            _copy_node_image(ready[-1] / "root", root)
        tmp = root.parent / "import"
        socket = tmp / "containerd" / "containerd.sock"
        tmp.mkdir(parents=True, exist_ok=True)
        service = _containerd_service("node-image", tmp, containerd_config(
            root, tmp / "state", socket, tmp / "cni", images[0]))
        service.start(timeout=60)
        try:
            for ref in images:
                tar = save(ref)
                t0 = time.monotonic()
                progress(f"importing {ref} into the node image ({tar.stat().st_size >> 20} MiB)")
                ctr(socket, "images", "import", "--snapshotter", "overlayfs", str(tar))
                tar.unlink()
                progress(f"imported {ref} in {time.monotonic() - t0:.0f}s")
            for line in ctr(socket, "images", "ls", "-q").stdout.split():
                if not any(_same_image(line, ref) for ref in images):
                    ctr(socket, "images", "rm", "--sync", line, check=False)
        finally:
            service.stop(grace=30)
            _umount_under(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        (root.parent / "ready").write_text(" ".join(images))
        for old in ready[:max(0, len(ready) + 1 - KEEP_NODE_IMAGES)]:
            shutil.rmtree(old, ignore_errors=True)
        for legacy in (base / "root", base / "import"):  # the single node image of before
            shutil.rmtree(legacy, ignore_errors=True)
        (base / "stamp").unlink(missing_ok=True)
        return root


def _same_image(ref: str, name: str) -> bool:
    """A normalized reference ('<default host>/library/phoenix-trainer:abc') names the
    short 'phoenix-trainer:abc' the lab's manifests use."""
    return ref == name or ref.endswith("/" + name)


def _copy_node_image(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["cp", "-al", str(src), str(dst)], check=True, capture_output=True)
    except subprocess.CalledProcessError:  # another filesystem: a real copy
        shutil.rmtree(dst, ignore_errors=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)], check=True)
    for db in _BOLT_DBS:
        target = dst / db
        if target.exists():
            target.unlink()
            shutil.copy2(src / db, target)


# ---- mounts and processes ----------------------------------------------------------------
def _mounts_under(prefix: Path) -> list[str]:
    prefix_s = str(prefix).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].replace("\\040", " ")
            if (mountpoint + "/").startswith(prefix_s):
                found.append(mountpoint)
    return found


def _umount_under(prefix: Path) -> None:
    for mountpoint in sorted(set(_mounts_under(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def shim_pids(socket: Path) -> list[int]:
    """containerd-shim processes serving the containerd at ``socket`` (they outlive it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = _cmdline(int(entry))
            if argv and "containerd-shim" in argv[0] and str(socket) in argv:
                pids.append(int(entry))
    return pids


def processes_of(node_dir: Path) -> list[int]:
    """Every kubelet, containerd and shim of the node at ``node_dir`` still alive."""
    needle = str(node_dir) + "/"
    return [int(e) for e in os.listdir("/proc") if e.isdigit()
            and any(needle in arg + "/" for arg in _cmdline(int(e)))]


def kill_tree(roots: list[int]) -> None:
    """SIGKILL the given processes and all their descendants, leaves first."""
    tree = _children()
    order: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        order.append(pid)
        stack.extend(tree.get(pid, []))
    for pid in reversed(order):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- a node ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeSpec:
    name: str
    index: int       # picks the bridge and pod range
    spot: bool
    gpus: int
    # A cold node: boots without the project's images (only the pause image) and pulls
    # from the lab's registry at this address (``registry.py``). None: the node image's.
    registry: str | None = None

    @property
    def labels(self) -> dict[str, str]:
        return {SPOT_LABEL: "true" if self.spot else "false", LAB_LABEL: "true"}

    @property
    def taints(self) -> list[dict]:
        return [{"key": SPOT_LABEL, "value": "true", "effect": "NoSchedule"}] if self.spot else []


class Node:
    """One kubelet + containerd + bridge. Files live under ``<state>/nodes/<name>``."""

    def __init__(self, spec: NodeSpec, state_dir: Path, net: LabNetwork, *,
                 ca_file: Path, kubeconfig: str, dns_ip: str, pause_image: str) -> None:
        self.spec = spec
        self.net = net
        self.dir = state_dir / "nodes" / spec.name
        self.ca_file = ca_file
        self.kubeconfig = kubeconfig  # the node's own credentials (system:node:<name>)
        self.dns_ip = dns_ip
        self.pause_image = pause_image

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ip(self) -> str:
        return self.net.gateway(self.spec.index)

    @property
    def socket(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    @property
    def registry_hosts(self) -> Path | None:
        return self.dir / "containerd" / "certs.d" if self.spec.registry else None

    @property
    def containerd(self) -> Service:
        return _containerd_service(self.name, self.dir, containerd_config(
            self.dir / "containerd" / "root", self.dir / "containerd" / "state", self.socket,
            self.dir / "cni" / "net.d", self.pause_image, self.registry_hosts))

    @property
    def kubelet(self) -> Service:
        return Service(
            name=f"kubelet-{self.name}", state_dir=self.dir,
            argv=[str(paths.binary("kubelet")), f"--config={self.dir / 'kubelet.yaml'}",
                  f"--kubeconfig={self.kubeconfig}", f"--hostname-override={self.name}",
                  f"--node-ip={self.ip}", f"--root-dir={self.dir / 'kubelet'}",
                  f"--cert-dir={self.dir / 'kubelet' / 'pki'}",
                  "--node-labels=" + ",".join(f"{k}={v}" for k, v in self.spec.labels.items()),
                  "--v=1"])

    def running(self) -> bool:
        return self.containerd.running() and self.kubelet.running()

    def booted_from(self) -> str | None:
        """The node image (its stamp) this node booted from."""
        try:
            return (self.dir / "image-stamp").read_text()
        except OSError:
            return None

    def start(self, node_image: Path, progress) -> None:
        """Boot the node afresh from the node image (a stopped node's files are stale)."""
        if self.running():
            return
        self.cleanup()
        self.remove_files()
        t0 = time.monotonic()
        _copy_node_image(node_image, self.dir / "containerd" / "root")
        (self.dir / "image-stamp").write_text(node_image.parent.name)
        progress(f"{self.name}: node image copied in {time.monotonic() - t0:.1f}s")
        self.net.add_bridge(self.spec.index)
        conf_dir = self.dir / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "10-phoenix.conflist").write_text(json.dumps(self.net.cni_config(
            self.name, self.spec.index, str(self.dir / "cni" / "ipam")), indent=2))
        self._write_kubelet_config()
        if self.spec.registry:
            hosts = self.registry_hosts / self.spec.registry
            hosts.mkdir(parents=True, exist_ok=True)
            (hosts / "hosts.toml").write_text(hosts_toml(self.spec.registry))
        self.containerd.start(timeout=60)
        if self.spec.registry:
            self.forget_images()
        self.kubelet.start(timeout=10)  # registration is awaited through the API

    def forget_images(self) -> None:
        """A cold node: every image but the pause image removed, its layers collected (the
        node image's files are hard links: only this node's copies go)."""
        rows = [line.split() for line in ctr(self.socket, "images", "ls").stdout.splitlines()[1:]]
        keep = {row[2] for row in rows if len(row) > 2 and _same_image(row[0], self.pause_image)}
        for row in rows:  # names and the runtime's sha256: references alike, but the pause's
            if len(row) > 2 and row[2] not in keep:
                ctr(self.socket, "images", "rm", "--sync", row[0])
        ctr(self.socket, "content", "prune", "references", check=False)

    def _write_kubelet_config(self) -> None:
        resolv = self.dir / "resolv.conf"
        resolv.write_text("")  # pods resolve through the lab's CoreDNS only
        (self.dir / "pod-logs").mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.ip, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.ca_file)}},
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local", "clusterDNS": [self.dns_ip],
            "resolvConf": str(resolv),
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "podLogsDir": str(self.dir / "pod-logs"),
            "registerWithTaints": self.spec.taints,
            # cgroup v1, no CAP_SYS_RESOURCE, no systemd: settings from LAB-NOTES.
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [], "failSwapOn": False, "protectKernelDefaults": False,
            "makeIPTablesUtilChains": False, "localStorageCapacityIsolation": False,
            "featureGates": {"KubeletInUserNamespace": True},
            # The machine's disk is shared by every lab node: never evict pods or collect
            # the node image's images because the disk looks full.
            "evictionHard": {"memory.available": "100Mi"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "5s", "nodeStatusReportFrequency": "30s",
            "syncFrequency": "10s", "fileCheckFrequency": "0s",
            "shutdownGracePeriod": "0s",
        }
        (self.dir / "kubelet.yaml").write_text(yaml.safe_dump(config))

    def kill(self) -> None:
        """Node loss: everything of this node dies at once, without a word."""
        roots = [pid for svc in (self.kubelet, self.containerd) if (pid := svc.pid())]
        kill_tree(roots + shim_pids(self.socket))
        for svc in (self.kubelet, self.containerd):
            svc.pidfile.unlink(missing_ok=True)

    def cleanup(self) -> None:
        """After a kill or a crash: no process, mount or network namespace of this node left."""
        self.kill()
        deadline = time.monotonic() + 10
        while shim_pids(self.socket) and time.monotonic() < deadline:
            time.sleep(0.1)
        _umount_under(self.dir)
        remove_netns_in(self.net.node_subnet(self.spec.index))

    def stop(self) -> None:
        """For `down`: stop the kubelet, kill what it ran, remove the node's files."""
        self.kubelet.stop(grace=5)
        self.cleanup()
        self.remove_files()

    def remove_files(self) -> None:
        if _mounts_under(self.dir):
            raise LabError(f"{self.dir} still has mounts: {_mounts_under(self.dir)[:3]}")
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_netns_in(subnet: str) -> None:
    """Delete the CNI network namespaces whose pod address lies in ``subnet``."""
    network = ipaddress.ip_network(subnet)
    netns_dir = Path("/var/run/netns")
    if not netns_dir.is_dir():
        return
    for ns in netns_dir.iterdir():
        if not ns.name.startswith("cni-"):
            continue
        out = subprocess.run(["ip", "-n", ns.name, "-o", "-4", "addr", "show"],
                             capture_output=True, text=True).stdout
        addrs = [fields[fields.index("inet") + 1].split("/")[0]
                 for fields in map(str.split, out.splitlines()) if "inet" in fields]
        if any(ipaddress.ip_address(a) in network for a in addrs):
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)

