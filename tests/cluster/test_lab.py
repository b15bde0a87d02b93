"""The lab is a real cluster where Phoenix depends on it: a 1.35 apiserver with production
authorization and admission, real kubelets running the project's images in containerd
(exit codes, termination messages, graceful deletion, logs), the Eviction API, node loss,
garbage collection, DNS, pod networking that stays on the lab's bridges, and RBAC."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kube_helpers import Beacon, create_namespace, python_pod, unique, wait_for

pytestmark = pytest.mark.cluster

SPOT = {"node_selector": {"phoenix.dev/spot": "true"},
        "tolerations": [{"key": "phoenix.dev/spot", "operator": "Exists", "effect": "NoSchedule"}]}

# Reports "started", then on SIGTERM reports "SIGTERM" (or ignores it) and exits.
SIGTERM_RECORDER = """
import signal, sys, time
def on_term(*_):
    beacon({key!r} + ':SIGTERM')
    time.sleep({linger})
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term if {handle} else signal.SIG_IGN)
beacon({key!r} + ':started')
time.sleep(600)
"""


@pytest.fixture(scope="module")
def ns(core):
    name = create_namespace(core, "labtest")
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def beacon(lab):
    b = Beacon(lab.host_ip)
    yield b
    b.close()


@pytest.fixture
def pod(lab):
    """pod(name, code, **kw): a python_pod manifest in the lab's trainer image."""
    def make(name, code, **kw):
        return python_pod(name, code, image=lab.trainer_image, **kw)
    return make


def terminated(core, ns, name):
    pod = core.read_namespaced_pod(name, ns)
    if pod.status.phase in ("Succeeded", "Failed"):
        return pod
    return None


def gone(core, ns, name):
    try:
        core.read_namespaced_pod(name, ns)
        return False
    except ApiException as e:
        return e.status == 404


def recorder(beacon, handle=True, linger=0.0):
    key = unique("rec")
    return key, beacon.code() + SIGTERM_RECORDER.format(key=key, handle=handle, linger=linger)


def start_recorder(core, ns, beacon, make_pod, name, handle=True, linger=0.0, **kw):
    key, code = recorder(beacon, handle, linger)
    core.create_namespaced_pod(ns, make_pod(name, code, **kw))
    wait_for(lambda: beacon.saw(f"{key}:started"), 90, what=f"pod {name} to start")
    return key


def test_server_version_is_1_35(lab):
    out = json.loads(lab.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"].startswith("v1.35.")


def test_nodes_are_real_kubelets_with_spot_label_taint_and_gpus(lab, core):
    nodes = core.list_node().items
    assert len(nodes) >= 3
    for node in nodes:
        assert node.status.node_info.kubelet_version.startswith("v1.35.")
        assert node.status.node_info.container_runtime_version.startswith("containerd://")
        assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    spot = core.list_node(label_selector="phoenix.dev/spot=true").items
    assert len(spot) >= 2
    for node in spot:
        assert node.status.allocatable["nvidia.com/gpu"] == "4"
        assert {(t.key, t.value, t.effect) for t in node.spec.taints or []} >= {
            ("phoenix.dev/spot", "true", "NoSchedule")}


def test_each_kubelet_is_confined_to_its_own_node_object(lab, core):
    """Node authorizer + NodeRestriction: a kubelet's credentials may not touch another node."""
    first, second = [n.metadata.name for n in core.list_node().items][:2]
    patch = lab.kubectl("--kubeconfig", lab.node(first).kubeconfig, "label", "node", second,
                        "stolen=yes", check=False)
    assert patch.returncode != 0 and "forbidden" in patch.stderr.lower()


def test_restricted_pod_security_rejects_a_root_pod(core, ns, pod):
    body = pod(unique("root"), "print(1)")
    del body["spec"]["containers"][0]["securityContext"]
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(ns, body)
    assert err.value.status == 403 and "restricted" in err.value.body


@pytest.mark.parametrize("code,phase,exit_code", [
    ("import sys; sys.exit(3)", "Failed", 3),
    ("print('ok')", "Succeeded", 0),
])
def test_exit_codes_become_pod_phase(core, ns, pod, code, phase, exit_code):
    name = unique("exit")
    core.create_namespaced_pod(ns, pod(name, code))
    p = wait_for(lambda: terminated(core, ns, name), 90, what=f"pod {name} to finish")
    assert p.status.phase == phase
    state = p.status.container_statuses[0].state.terminated
    assert state.exit_code == exit_code
    assert state.reason == ("Completed" if exit_code == 0 else "Error")


def test_termination_message_logs_and_events(lab, core, ns, pod):
    name = unique("msg")
    code = ("import os, json, sys; print('hello from', os.getpid(), flush=True); "
            "open('/dev/termination-log', 'w')"
            ".write(json.dumps({'reason': 'preempted', 'step': 42})); sys.exit(143)")
    core.create_namespaced_pod(ns, pod(name, code))
    p = wait_for(lambda: terminated(core, ns, name), 90, what="pod to finish")
    state = p.status.container_statuses[0].state.terminated
    assert state.exit_code == 143
    assert json.loads(state.message) == {"reason": "preempted", "step": 42}
    # python is PID 1 of its container; its output reaches `kubectl logs` via the kubelet.
    assert "hello from 1" in lab.pod_logs(ns, name)
    described = lab.kubectl("describe", "pod", "-n", ns, name).stdout
    assert "Exit Code:    143" in described and "containerd://" in described
    events = lab.kubectl("get", "events", "-n", ns, "--field-selector",
                         f"involvedObject.name={name}", "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert {"Scheduled", "Created", "Started"} <= reasons


def test_secret_and_downward_api_reach_the_container_env(core, ns, pod):
    name = unique("env")
    core.create_namespaced_secret(ns, client.V1Secret(
        metadata=client.V1ObjectMeta(name=name), string_data={"token": "s3cr3t"}))
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "token"}}},
           {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    code = ("import os, sys; sys.exit(0 if os.environ['TOKEN'] == 's3cr3t' and "
            "os.environ['POD'] == '%s' else 9)" % name)
    core.create_namespaced_pod(ns, pod(name, code, env=env))
    p = wait_for(lambda: terminated(core, ns, name), 90, what="pod to finish")
    assert p.status.phase == "Succeeded"


def test_pods_reach_each_other_across_nodes_by_dns_and_nothing_outside(lab, core, ns, pod,
                                                                        beacon):
    """A headless Service gives a pod a DNS name; a pod on another node reaches it there.
    Pods have routes for the lab's own range only (no default route, no uplink)."""
    server, svc = unique("srv"), unique("svc")
    core.create_namespaced_service(ns, client.V1Service(
        metadata=client.V1ObjectMeta(name=svc),
        spec=client.V1ServiceSpec(cluster_ip="None", selector={"app": server},
                                  ports=[client.V1ServicePort(port=8000)])))
    serve = ("import http.server, socketserver\n"
             "socketserver.TCPServer(('0.0.0.0', 8000), http.server.SimpleHTTPRequestHandler)"
             ".serve_forever()\n")
    body = pod(server, serve, labels={"app": server}, **SPOT)
    body["spec"].update({"hostname": server, "subdomain": svc})
    core.create_namespaced_pod(ns, body)
    p = wait_for(lambda: (lambda x: x if x.status.phase == "Running" else None)(
        core.read_namespaced_pod(server, ns)), 90, what="server pod running")
    fqdn = f"{server}.{svc}.{ns}.svc.cluster.local"
    client_code = beacon.code() + (
        "import socket, urllib.request, time\n"
        "for _ in range(60):\n"
        "    try:\n"
        f"        ip = socket.gethostbyname({fqdn!r}); break\n"
        "    except OSError: time.sleep(0.5)\n"
        f"urllib.request.urlopen('http://{fqdn}:8000/', timeout=10).read()\n"
        "routes = [l.split()[1] for l in open('/proc/net/route').read().splitlines()[1:]]\n"
        f"beacon({server!r} + ':' + ip + ':' + ','.join(routes))\n")
    other = [n.metadata.name for n in core.list_node().items
             if n.metadata.name != p.spec.node_name][0]
    name = unique("cli")
    body = pod(name, client_code, tolerations=SPOT["tolerations"])
    body["spec"]["nodeName"] = other
    core.create_namespaced_pod(ns, body)
    done = wait_for(lambda: terminated(core, ns, name), 120, what="client pod to finish")
    assert done.status.phase == "Succeeded", lab.pod_logs(ns, name)
    [msg] = [m for m in beacon.messages if m.startswith(server + ":")]
    _, ip, routes = msg.split(":")
    assert ip == p.status.pod_ip and lab.net.contains(ip)
    # /proc/net/route destinations (little-endian hex): never the default route 00000000.
    assert "00000000" not in routes.split(","), routes
    # Every bridge keeps the MAC the lab gave it, whichever pods' veths came and went (the
    # client's just did): pods' cached gateway address stays right (network.py).
    for n in lab.node_specs:
        sys_dir = Path("/sys/class/net") / lab.net.bridge(n.index)
        got = ((sys_dir / "address").read_text().strip(),
               (sys_dir / "addr_assign_type").read_text().strip())
        assert got == (lab.net.bridge_mac(n.index), "3"), (n.name, got)


def test_graceful_delete_sends_sigterm_then_pod_is_gone(core, ns, pod, beacon):
    name = unique("grace")
    key = start_recorder(core, ns, beacon, pod, name, grace=5)
    core.delete_namespaced_pod(name, ns, grace_period_seconds=5)
    wait_for(lambda: gone(core, ns, name), 60, what="pod to be deleted")
    assert beacon.saw(f"{key}:SIGTERM")


def test_pod_ignoring_sigterm_is_killed_after_grace(core, ns, pod, beacon):
    name = unique("stubborn")
    key = start_recorder(core, ns, beacon, pod, name, handle=False, grace=3)
    t0 = time.monotonic()
    core.delete_namespaced_pod(name, ns, grace_period_seconds=3)
    wait_for(lambda: gone(core, ns, name), 60, what="pod to be killed and deleted")
    assert time.monotonic() - t0 >= 2.5, "the pod went away before its grace period ended"
    assert not beacon.saw(f"{key}:SIGTERM")


def test_eviction_sets_disruption_target_and_sends_sigterm(lab, core, ns, pod, beacon):
    name = unique("evict")
    # The pod lingers after SIGTERM so the DisruptionTarget condition can be observed.
    key = start_recorder(core, ns, beacon, pod, name, linger=3, grace=10, **SPOT)
    lab.evict(ns, name)
    p = wait_for(lambda: core.read_namespaced_pod(name, ns), 5)
    conds = {c.type: c for c in p.status.conditions or []}
    assert conds["DisruptionTarget"].status == "True"
    assert conds["DisruptionTarget"].reason == "EvictionByEvictionAPI"
    wait_for(lambda: gone(core, ns, name), 60, what="evicted pod to be deleted")
    assert beacon.saw(f"{key}:SIGTERM")


def test_kill_pod_reports_signal_exit_code(lab, core, ns, pod, beacon):
    name = unique("sigkill")
    start_recorder(core, ns, beacon, pod, name)
    lab.kill_pod(ns, name, signal.SIGKILL)
    p = wait_for(lambda: terminated(core, ns, name), 60, what="killed pod to be reported")
    assert p.status.container_statuses[0].state.terminated.exit_code == 137


# full: the lab's node loss itself (make test loses nodes in test_cli_and_nodeloss and the chaos e2e)
@pytest.mark.full
@pytest.mark.slow
def test_node_loss_kills_containers_and_a_replacement_registers(lab, core, ns, pod, beacon):
    name = unique("nodeloss")
    key = start_recorder(core, ns, beacon, pod, name, **SPOT)
    node = core.read_namespaced_pod(name, ns).spec.node_name
    before = {n.metadata.name for n in core.list_node(label_selector="phoenix.dev/spot=true").items}
    replacement = lab.lose_node(node)
    # Nothing of the lost node survives: no kubelet, containerd, shim or container.
    assert not lab.node_processes(node), lab.node_processes(node)
    # A replacement spot node registers, as a node group would bring one up.
    wait_for(lambda: {n.metadata.name for n in core.list_node(
        label_selector="phoenix.dev/spot=true").items} - before == {replacement.name}, 60,
        what="replacement node")
    lab.wait_nodes_ready([replacement.name])
    # Pod GC (controller-manager) deletes pods bound to a node that no longer exists.
    wait_for(lambda: gone(core, ns, name), 150, interval=1, what="pod GC of the orphaned pod")
    assert not beacon.saw(f"{key}:SIGTERM"), "a lost node's container must die without a SIGTERM"


def test_deleting_owner_garbage_collects_owned_pods(core, ns, pod):
    owner = core.create_namespaced_config_map(ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=unique("owner"))))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name,
           "uid": owner.metadata.uid, "blockOwnerDeletion": True}
    name = unique("owned")
    core.create_namespaced_pod(ns, pod(name, "import time; time.sleep(600)", owner=ref, grace=1))
    wait_for(lambda: core.read_namespaced_pod(name, ns).status.phase == "Running", 90,
             what="pod running")
    core.delete_namespaced_config_map(owner.metadata.name, ns)
    wait_for(lambda: gone(core, ns, name), 90, interval=0.5, what="garbage collection of the owned pod")


def test_rbac_forbids_serviceaccount_without_binding(lab, core, ns):
    sa = unique("nobody")
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa)))
    denied = lab.kubectl("get", "pods", "-n", ns, f"--as=system:serviceaccount:{ns}:{sa}", check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr
    allowed = lab.kubectl("get", "pods", "-n", ns, check=False)
    assert allowed.returncode == 0
    # The same holds for a real token of that ServiceAccount, not only impersonation.
    kubeconfig = lab.serviceaccount_kubeconfig(ns, sa)
    from kubernetes import config as kconfig
    with kconfig.new_client_from_config(config_file=kubeconfig) as sa_api:
        with pytest.raises(ApiException) as err:
            client.CoreV1Api(sa_api).list_namespaced_pod(ns)
        assert err.value.status == 403

