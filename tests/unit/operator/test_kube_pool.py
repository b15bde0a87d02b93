"""kube.load_config keeps at least one HTTP connection per API worker thread."""
import pytest
from kubernetes import client, config

from phoenix_operator import kube

pytestmark = pytest.mark.unit


@pytest.fixture
def default_configuration():
    saved = client.Configuration.get_default_copy()
    yield
    client.Configuration.set_default(saved)


def test_pool_holds_a_connection_per_worker(monkeypatch, default_configuration):
    def not_in_cluster():
        raise config.ConfigException("not in a cluster")

    monkeypatch.setattr(config, "load_incluster_config", not_in_cluster)
    monkeypatch.setattr(config, "load_kube_config", lambda: None)
    small = client.Configuration()
    small.connection_pool_maxsize = 4
    client.Configuration.set_default(small)
    kube.load_config(pool_size=16)
    assert client.Configuration.get_default_copy().connection_pool_maxsize == 16
    assert kube.Kube().api.rest_client.pool_manager.connection_pool_kw["maxsize"] == 16
