"""Shared fixtures: real S3 servers on loopback and (for cluster/e2e tests) the lab.

Servers are session-scoped and live in a per-session temp dir, so tests never touch a lab
a developer has running for the demo. ``s3_server`` is parametrized over two independent
S3 implementations, versitygw (plain HTTP, path-style) and SeaweedFS (TLS with a lab CA,
which the session's ``AWS_CA_BUNDLE`` names, as a trainer pod's does), so every test that
uses it runs once per server and its id says which (``[versitygw]``, ``[seaweedfs]``).
``PHOENIX_S3_SERVERS=versitygw`` (comma-separated) runs a subset. The cluster and e2e layers
are parametrized the same way over the lab's two servers (tests/cluster/conftest.py
``lab_s3_server``, tests/e2e/conftest.py ``e2e``).

What ``make test`` leaves out, decided in tests/s3_selection.py:

- tests marked ``full`` (a second test of a story ``make test`` already covers, each a minute
  or more on the lab: the whole-gang, standby-gang and three-member gang e2e runs, the
  straggler, the standby's take-overs, the framework examples on the lab, ...; each says where
  it is marked which test covers its story in ``make test``) run only with ``PHOENIX_FULL=1``
  (``make test-all``);
- the ``slow`` storage tests (kill-and-resume runs of whole training scripts: they test
  Phoenix's resume logic, the S3 calls they make are the fast tests' too) run against the
  first server only, unless ``PHOENIX_S3_SLOW_ON_ALL=1`` (``make test-storage-all``): against
  both they would add about 7 minutes;
- cluster and e2e tests run against the first server only, unless marked ``all_s3_servers``
  or ``PHOENIX_LAB_S3_ON_ALL=1`` (``make test-s3-all``).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import pytest

from phoenix_lab.s3 import S3Endpoint, S3Server, SeaweedS3Server

import s3_selection
import timing_report


def pytest_configure(config):
    config.pluginmanager.register(timing_report.TimingReport(), "phoenix-timing-report")


def _on(variable: str) -> bool:
    return os.environ.get(variable, "") in ("1", "true")


def pytest_collection_modifyitems(config, items):
    """What ``make test`` leaves out (the ``full`` tier, tests on the second S3 server): see
    tests/s3_selection.py."""
    _s3_server_params()  # a bad PHOENIX_S3_SERVERS is a usage error, not a failed test
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        markers = {m.name for m in item.iter_markers()}
        (drop if s3_selection.deselected(params, markers, os.environ) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    """Which tier runs, and a warning when other labs run on this machine: they share its
    cores and slow this run (the demo's lab, left running, made a 29-minute suite take 55)."""
    lines = ["tier: everything (PHOENIX_FULL=1)" if _on("PHOENIX_FULL") else
             "tier: make test (tests marked `full` deselected; `make test-all` runs them)"]
    try:
        from phoenix_lab.network import labs_running, slice_owner
        others = labs_running()
    except Exception:  # noqa: BLE001 - no `ip`, no lab package: nothing to warn about
        others = []
    if others:
        where = ", ".join(str((slice_owner(i) or ("?",))[0]) for i in others)
        lines.append(f"warning: {len(others)} other lab(s) running on this machine ({where}): they "
                     "share its cores and slow this run; stop one with "
                     "`.venv/bin/phoenix-lab --state-dir DIR down`")
    return lines


@dataclass(frozen=True)
class Bucket:
    endpoint: S3Endpoint
    name: str

    @property
    def uri(self) -> str:
        return f"s3://{self.name}"

    def client(self):
        return self.endpoint.client()


S3_SERVERS = {"versitygw": S3Server, "seaweedfs": SeaweedS3Server}


def _s3_server_params() -> list[str]:
    try:
        return s3_selection.servers(os.environ)
    except ValueError as e:
        raise pytest.UsageError(f"PHOENIX_S3_SERVERS: {e}") from e


@pytest.fixture(scope="session", params=_s3_server_params())
def s3_server(request, tmp_path_factory) -> S3Endpoint:
    server = S3_SERVERS[request.param](tmp_path_factory.mktemp(f"s3-{request.param}"))
    endpoint = server.start()
    with pytest.MonkeyPatch.context() as mp:
        # boto3 clients made anywhere in this process (the tests' own Credentials, the
        # operator's code) trust the lab CA the way a pod does: through AWS_CA_BUNDLE
        if endpoint.ca_bundle:
            mp.setenv("AWS_CA_BUNDLE", endpoint.ca_bundle)
        else:
            mp.delenv("AWS_CA_BUNDLE", raising=False)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Endpoint) -> Bucket:
    """A fresh, empty bucket on the session's S3 server."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return Bucket(s3_server, name)


@pytest.fixture
def s3_env(s3_server: S3Endpoint, monkeypatch) -> S3Endpoint:
    """Export the S3 server's endpoint and credentials the way the trainer pod gets them."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A whole lab cluster (control plane, CoreDNS, real kubelet + containerd nodes, S3) for
    this test session, on free ports in a temp state dir; torn down at the end."""
    from phoenix_lab.cluster import Lab, LabPorts

    the_lab = Lab(tmp_path_factory.mktemp("lab"), ports=LabPorts.ephemeral())
    try:
        the_lab.up()
        timing_report.note("lab up", the_lab.timings)
        yield the_lab
    finally:
        the_lab.down()
