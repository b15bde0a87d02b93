"""The lab behaves like a real cluster where Phoenix depends on it: a 1.35 apiserver, a
kubelet-like node agent (exit codes, termination messages, graceful deletion), the
Eviction API, node loss, garbage collection, and RBAC."""
from __future__ import annotations

import json
import signal
import time

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kube_helpers import python_pod, unique, wait_for

pytestmark = pytest.mark.cluster

SPOT = {"node_selector": {"phoenix.dev/spot": "true"},
        "tolerations": [{"key": "phoenix.dev/spot", "operator": "Exists", "effect": "NoSchedule"}]}

SIGTERM_RECORDER = """
import signal, sys, time, pathlib
marker = pathlib.Path(sys.argv[0] if False else '{marker}')
def on_term(*_):
    marker.write_text('SIGTERM')
    sys.exit(0 if {exit_clean} else 143)
signal.signal(signal.SIGTERM, on_term if {handle} else signal.SIG_IGN)
pathlib.Path('{marker}.started').write_text('1')
time.sleep(600)
"""


@pytest.fixture(scope="module")
def core(lab):
    with lab.api_client() as api:
        yield client.CoreV1Api(api)


@pytest.fixture(scope="module")
def ns(lab, core):
    name = unique("labtest")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(lambda: core.read_namespaced_service_account("default", name), 60,
             what="default ServiceAccount (controller-manager)")
    yield name
    core.delete_namespace(name)


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


def recorder(tmp_path, handle=True, exit_clean=False):
    marker = tmp_path / unique("sigterm")
    code = SIGTERM_RECORDER.format(marker=marker, handle=handle, exit_clean=exit_clean)
    return marker, code


def test_server_version_is_1_35(lab):
    out = json.loads(lab.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"].startswith("v1.35.")


def test_nodes_have_spot_label_and_gpus(lab, core):
    spot = core.list_node(label_selector="phoenix.dev/spot=true").items
    assert len(spot) >= 2
    for node in spot:
        assert node.status.allocatable["nvidia.com/gpu"] == "4"
        assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


@pytest.mark.parametrize("code,phase,exit_code", [
    ("import sys; sys.exit(3)", "Failed", 3),
    ("print('ok')", "Succeeded", 0),
])
def test_exit_codes_become_pod_phase(core, ns, code, phase, exit_code):
    name = unique("exit")
    core.create_namespaced_pod(ns, python_pod(name, code))
    pod = wait_for(lambda: terminated(core, ns, name), 60, what=f"pod {name} to finish")
    assert pod.status.phase == phase
    state = pod.status.container_statuses[0].state.terminated
    assert state.exit_code == exit_code
    assert state.reason == ("Completed" if exit_code == 0 else "Error")


def test_termination_message_reaches_container_status(core, ns):
    name = unique("msg")
    code = ("import os, json, sys; open(os.environ['PHOENIX_TERMINATION_LOG'], 'w')"
            ".write(json.dumps({'reason': 'preempted', 'step': 42})); sys.exit(143)")
    core.create_namespaced_pod(ns, python_pod(name, code))
    pod = wait_for(lambda: terminated(core, ns, name), 60, what="pod to finish")
    state = pod.status.container_statuses[0].state.terminated
    assert state.exit_code == 143
    assert json.loads(state.message) == {"reason": "preempted", "step": 42}


def test_secret_values_reach_the_process_env(core, ns):
    name = unique("env")
    core.create_namespaced_secret(ns, client.V1Secret(
        metadata=client.V1ObjectMeta(name=name), string_data={"token": "s3cr3t"}))
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "token"}}},
           {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    code = "import os, sys; sys.exit(0 if os.environ['TOKEN'] == 's3cr3t' and os.environ['POD'] == '%s' else 9)" % name
    core.create_namespaced_pod(ns, python_pod(name, code, env=env))
    pod = wait_for(lambda: terminated(core, ns, name), 60, what="pod to finish")
    assert pod.status.phase == "Succeeded"


def test_graceful_delete_sends_sigterm_then_pod_is_gone(core, ns, tmp_path):
    name = unique("grace")
    marker, code = recorder(tmp_path)
    core.create_namespaced_pod(ns, python_pod(name, code, grace=5))
    wait_for(lambda: marker.with_suffix(".started").exists() or
             (tmp_path / (marker.name + ".started")).exists(), 60, what="pod process to start")
    core.delete_namespaced_pod(name, ns, grace_period_seconds=5)
    wait_for(lambda: gone(core, ns, name), 30, what="pod to be deleted")
    assert marker.read_text() == "SIGTERM"


def test_pod_ignoring_sigterm_is_killed_after_grace(core, ns, tmp_path):
    name = unique("stubborn")
    marker, code = recorder(tmp_path, handle=False)
    core.create_namespaced_pod(ns, python_pod(name, code, grace=3))
    wait_for(lambda: (tmp_path / (marker.name + ".started")).exists(), 60, what="pod process to start")
    t0 = time.monotonic()
    core.delete_namespaced_pod(name, ns, grace_period_seconds=3)
    wait_for(lambda: gone(core, ns, name), 30, what="pod to be killed and deleted")
    assert time.monotonic() - t0 >= 2.5, "the pod went away before its grace period ended"
    assert not marker.exists()


def test_eviction_sets_disruption_target_and_sends_sigterm(lab, core, ns, tmp_path):
    name = unique("evict")
    marker, code = recorder(tmp_path)
    # A pod that survives SIGTERM briefly so the DisruptionTarget condition can be observed.
    code = code.replace("marker.write_text('SIGTERM')", "marker.write_text('SIGTERM'); time.sleep(2)")
    core.create_namespaced_pod(ns, python_pod(name, code, grace=10, **SPOT))
    wait_for(lambda: (tmp_path / (marker.name + ".started")).exists(), 60, what="pod process to start")
    lab.evict(ns, name)
    pod = wait_for(lambda: core.read_namespaced_pod(name, ns), 5)
    conds = {c.type: c for c in pod.status.conditions or []}
    assert conds["DisruptionTarget"].status == "True"
    assert conds["DisruptionTarget"].reason == "EvictionByEvictionAPI"
    wait_for(lambda: gone(core, ns, name), 30, what="evicted pod to be deleted")
    assert marker.read_text() == "SIGTERM"


def test_kill_pod_reports_signal_exit_code(lab, core, ns, tmp_path):
    name = unique("sigkill")
    marker, code = recorder(tmp_path)
    core.create_namespaced_pod(ns, python_pod(name, code))
    wait_for(lambda: (tmp_path / (marker.name + ".started")).exists(), 60, what="pod process to start")
    lab.kill_pod(ns, name, signal.SIGKILL)
    pod = wait_for(lambda: terminated(core, ns, name), 30, what="killed pod to be reported")
    assert pod.status.container_statuses[0].state.terminated.exit_code == 137


@pytest.mark.slow
def test_node_loss_kills_processes_and_pod_gc_cleans_up(lab, core, ns, tmp_path):
    name = unique("nodeloss")
    marker, code = recorder(tmp_path)
    core.create_namespaced_pod(ns, python_pod(name, code, **SPOT))
    wait_for(lambda: (tmp_path / (marker.name + ".started")).exists(), 60, what="pod process to start")
    node = core.read_namespaced_pod(name, ns).spec.node_name
    before = {n.metadata.name for n in core.list_node(label_selector="phoenix.dev/spot=true").items}
    lab.lose_node(node)
    # A replacement spot node registers, as a node group would bring one up.
    wait_for(lambda: len({n.metadata.name for n in core.list_node(
        label_selector="phoenix.dev/spot=true").items} - before) == 1, 30, what="replacement node")
    # Pod GC (controller-manager) deletes pods bound to a node that no longer exists.
    wait_for(lambda: gone(core, ns, name), 150, interval=1, what="pod GC of the orphaned pod")
    assert not marker.exists(), "a lost node's process must die without a SIGTERM"


def test_deleting_owner_garbage_collects_owned_pods(core, ns):
    owner = core.create_namespaced_config_map(ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=unique("owner"))))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name,
           "uid": owner.metadata.uid, "blockOwnerDeletion": True}
    name = unique("owned")
    core.create_namespaced_pod(ns, python_pod(name, "import time; time.sleep(600)", owner=ref, grace=1))
    wait_for(lambda: core.read_namespaced_pod(name, ns).status.phase == "Running", 60, what="pod running")
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
    with lab.api_client() as _:
        from kubernetes import config as kconfig
        with kconfig.new_client_from_config(config_file=kubeconfig) as sa_api:
            with pytest.raises(ApiException) as err:
                client.CoreV1Api(sa_api).list_namespaced_pod(ns)
            assert err.value.status == 403
