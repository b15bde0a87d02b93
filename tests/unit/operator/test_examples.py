"""Sample PhoenixJobs parse and produce sensible trainer pods (the cluster tests check that
the API server accepts the same shapes)."""
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from phoenix_operator.decide import Listing, decide

pytestmark = pytest.mark.unit

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples").glob("phoenixjob-*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_starts_its_first_phase(path):
    body = yaml.safe_load(path.read_text())
    body["metadata"].update(namespace="default", uid="u", generation=1)
    first = body["spec"]["phases"][0]["name"]
    plan = decide(body, [], {first: Listing()}, datetime(2026, 1, 1, tzinfo=timezone.utc))
    replicas = body["spec"]["phases"][0].get("replicas", 1)
    base = f"{body['metadata']['name']}.{first}-1"
    want = [base] if replicas == 1 else [f"{base}.{i}" for i in range(replicas)]
    assert [c.name for c in plan.create] == want
    assert plan.status["phase"] == "Running"


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_trainer_pods_meet_restricted_pod_security(path):
    """What users copy must run where namespaces enforce the restricted standard, with a
    read-only root filesystem and a writable /tmp for the checkpoint spool."""
    spec = yaml.safe_load(path.read_text())["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert any(m["mountPath"] == "/tmp" and m["name"] in tmp_volumes
                   for m in c["volumeMounts"])
