"""The chart ships the one CRD: byte-identical to crds/, and every schema field documented."""
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]


def test_chart_crd_is_identical_to_source():
    src = (REPO / "crds" / "phoenixjobs.yaml").read_bytes()
    assert (REPO / "charts" / "phoenix" / "crds" / "phoenixjobs.yaml").read_bytes() == src


def _walk(schema, path):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_every_spec_and_status_field_has_a_description():
    crd = yaml.safe_load((REPO / "crds" / "phoenixjobs.yaml").read_text())
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    missing = [p for part in ("spec", "status")
               for p, s in _walk(root["properties"][part], part)
               if not s.get("description") and not (p.endswith("[]") and s["type"] != "object")]
    assert missing == []


def test_every_status_field_the_operator_writes_is_in_the_schema():
    """The API server prunes unknown fields: a status key missing from the schema would be
    silently dropped (and the operator would forget it)."""
    from datetime import datetime, timezone

    from phoenix_operator.constants import PhaseState
    from phoenix_operator.phoenixjob import CheckpointRef, Failure, PhaseStatus

    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    full = PhaseStatus(
        name="x", state=PhaseState.RUNNING, attempts=1, preemptions=1, failures=1,
        consecutive_failures_at_checkpoint=1, skipped_steps=(1,), pod="p", pod_uid="u",
        resume_from="s3://b/x", next_attempt_at=t, started_at=t, completed_at=t,
        last_failure=Failure("failure", "Error", 1, "m", t, 1),
        last_checkpoint=CheckpointRef("s3://b/x", 1, 0, t)).to_dict()
    crd = yaml.safe_load((REPO / "crds" / "phoenixjobs.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    item = status["properties"]["phases"]["items"]["properties"]
    for key, value in full.items():
        assert key in item, key
        if isinstance(value, dict):
            assert set(value) <= set(item[key]["properties"]), key
    top = {"phase", "currentPhase", "observedGeneration", "step", "preemptions", "failures",
           "lastCheckpointTime", "conditions", "phases"}
    assert top <= set(status["properties"])
