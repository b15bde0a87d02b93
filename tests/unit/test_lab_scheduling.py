"""The node agent's scheduling and env-expansion rules (pure functions)."""
import pytest

from phoenix_lab.nodeagent import NodeSpec, choose_node, expand, node_fits

pytestmark = pytest.mark.unit

SPOT = NodeSpec("lab-spot-1", spot=True, gpus=4).manifest()
SPOT2 = NodeSpec("lab-spot-2", spot=True, gpus=4).manifest()
ONDEMAND = NodeSpec("lab-ondemand-0", spot=False, gpus=0).manifest()
TOLERATE_SPOT = [{"key": "phoenix.dev/spot", "operator": "Exists", "effect": "NoSchedule"}]


def pod(gpus=0, node_selector=None, tolerations=None, affinity=None):
    c = {"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}}
    spec = {"containers": [c]}
    if node_selector:
        spec["nodeSelector"] = node_selector
    if tolerations:
        spec["tolerations"] = tolerations
    if affinity:
        spec["affinity"] = affinity
    return {"spec": spec}


@pytest.mark.parametrize("the_pod,node,used,reason", [
    (pod(), ONDEMAND, 0, None),
    (pod(), SPOT, 0, "untolerated taint phoenix.dev/spot"),
    (pod(tolerations=TOLERATE_SPOT), SPOT, 0, None),
    (pod(tolerations=[{"key": "phoenix.dev/spot", "operator": "Equal", "value": "true"}]), SPOT, 0, None),
    (pod(tolerations=[{"key": "phoenix.dev/spot", "operator": "Equal", "value": "no"}]), SPOT, 0,
     "untolerated taint phoenix.dev/spot"),
    (pod(gpus=1), ONDEMAND, 0, "insufficient nvidia.com/gpu"),
    (pod(gpus=4, tolerations=TOLERATE_SPOT), SPOT, 0, None),
    (pod(gpus=2, tolerations=TOLERATE_SPOT), SPOT, 3, "insufficient nvidia.com/gpu"),
    (pod(node_selector={"phoenix.dev/spot": "true"}), ONDEMAND, 0, "node selector phoenix.dev/spot=true"),
    (pod(affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "phoenix.dev/spot", "operator": "In", "values": ["true"]}]}]}}}),
     ONDEMAND, 0, "node affinity"),
])
def test_node_fits(the_pod, node, used, reason):
    assert node_fits(the_pod, node, used) == reason


def test_choose_node_spreads_by_gpu_use_and_explains_failure():
    p = pod(gpus=1, tolerations=TOLERATE_SPOT)
    assert choose_node(p, [SPOT, SPOT2], {"lab-spot-1": 2})[0] == "lab-spot-2"
    name, reasons = choose_node(pod(gpus=8, tolerations=TOLERATE_SPOT), [SPOT, ONDEMAND], {})
    assert name is None and "insufficient nvidia.com/gpu" in reasons


def test_expand_variable_references():
    env = {"STEP": "10", "NAME": "x"}
    assert expand("--step=$(STEP) $(NAME)/$(MISSING)", env) == "--step=10 x/$(MISSING)"
