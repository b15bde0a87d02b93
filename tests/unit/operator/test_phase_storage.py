"""phase_storage: one storage client per bucket and credentials, however many threads ask at once."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from phoenix_operator import phase_storage
from phoenix_trainer.core.storage import Credentials

pytestmark = pytest.mark.unit


def test_concurrent_first_use_builds_one_client(monkeypatch):
    built = []
    gate = threading.Barrier(8)

    class FakeRoot:
        def child(self, prefix):
            return (self, prefix)

    def slow_open(uri, **kwargs):
        built.append(uri)
        time.sleep(0.05)  # as building a boto3 client takes a while, so misses overlap
        return FakeRoot()

    monkeypatch.setattr(phase_storage, "_open_bucket", slow_open)
    phase_storage._new_bucket.cache_clear()

    def use(i):
        gate.wait()
        return phase_storage._storage(f"s3://bkt/job-{i}", Credentials(
            endpoint_url="http://s3", access_key="ak", secret_key="sk"))

    try:
        with ThreadPoolExecutor(8) as pool:
            handles = list(pool.map(use, range(8)))
        assert built == ["s3://bkt"]
        assert len({id(root) for root, _ in handles}) == 1
        assert sorted(prefix for _, prefix in handles) == [f"job-{i}" for i in range(8)]
    finally:
        phase_storage._new_bucket.cache_clear()
