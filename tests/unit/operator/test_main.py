"""kopf is configured to watch only Phoenix's pods, filtered by the API server."""
import kopf
import pytest
from kopf._cogs.structs.references import Resource

from phoenix_operator.main import configure

pytestmark = pytest.mark.unit


def resource(group, version, plural):
    return Resource(group=group, version=version, plural=plural, namespaced=True)


def test_pod_watch_is_filtered_server_side_and_nothing_else_is():
    settings = kopf.OperatorSettings()
    configure(settings)
    selectors = settings.watching.label_selectors
    assert list(selectors.collect(resource("", "v1", "pods"))) == ["phoenix.dev/job"]
    assert list(selectors.collect(resource("", "v1", "nodes"))) == []
    assert list(selectors.collect(resource("phoenix.dev", "v1alpha1", "phoenixjobs"))) == []
    assert settings.peering.standalone
