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
