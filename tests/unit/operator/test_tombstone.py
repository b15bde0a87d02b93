"""What the operator keeps of a vanished pod (``gather.tombstone``) decides exactly what the
full pod would, at a fraction of its size."""
from __future__ import annotations

import json

import pytest

from phoenix_operator.node_health import NodeHealth
from phoenix_operator.outcomes import DELETED_KEY, classify
from phoenix_operator.gather import tombstone

from opfacts import at, pod

pytestmark = pytest.mark.unit

PODS = [
    pod(),
    pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI", node="spot-1"),
    pod(pod_phase="Failed", exit_code=137, node="spot-1"),
    pod(pod_phase="Failed", exit_code=1, message="boom"),
    pod(pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI", deletion=at(0)),
    pod(waiting="ImagePullBackOff"),
    pod(status_reason="OutOfnvidia.com/gpu", pod_phase="Failed"),
]


def heavy(p: dict) -> dict:
    """``p`` as the API returns it: managedFields and a full spec."""
    p = json.loads(json.dumps(p))
    p["metadata"]["managedFields"] = [{"manager": "kubelet", "operation": "Update",
                                       "fieldsV1": {f"f:{i}": {} for i in range(200)}}] * 3
    p["spec"].update(volumes=[{"name": f"v{i}", "emptyDir": {}} for i in range(10)],
                     tolerations=[{"key": "k", "operator": "Exists"}] * 10)
    p["spec"]["containers"][0].update(env=[{"name": f"E{i}", "value": "x" * 50} for i in range(30)])
    return p


@pytest.mark.parametrize("p", PODS)
def test_a_tombstone_classifies_as_the_pod_does(p):
    full = heavy(p)
    nodes = {"spot-1": NodeHealth(missing=True)}
    for deleted in (False, True):
        a, b = dict(full), dict(tombstone(full))
        if deleted:
            a[DELETED_KEY] = b[DELETED_KEY] = True
        assert classify(a, nodes, at(5)) == classify(b, nodes, at(5))
    assert len(json.dumps(tombstone(full))) < len(json.dumps(full)) / 4


def test_a_tombstone_is_a_copy():
    full = heavy(pod(node="spot-1"))
    kept = tombstone(full)
    full["status"]["phase"] = "Failed"
    full["metadata"]["labels"]["x"] = "y"
    assert kept["status"]["phase"] == "Running" and "x" not in kept["metadata"]["labels"]
    assert kept["spec"]["nodeName"] == "spot-1"
