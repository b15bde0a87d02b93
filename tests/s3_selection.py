"""Which S3 server each test runs against, and which tests ``make test`` keeps.

The storage layer's ``s3_server`` fixture, the cluster layer's ``lab_s3_server`` and the e2e
layer's ``e2e`` are parametrized over the servers ``PHOENIX_S3_SERVERS`` names (default:
``phoenix_lab.s3.SERVER_NAMES``, versitygw first), so a test's id says which
(``[versitygw]``, ``[seaweedfs]``). Against every server the suite would not fit its time
budget, so by default:

- a test marked ``full`` (another test of a story ``make test`` covers) runs only with
  ``PHOENIX_FULL=1`` (``make test-all``);
- a ``slow`` storage test runs against the first server only, unless
  ``PHOENIX_S3_SLOW_ON_ALL=1`` (``make test-storage-all``, ``make test-s3-all``);
- a cluster or e2e test runs against the first server only, unless it is marked
  ``all_s3_servers`` or ``PHOENIX_LAB_S3_ON_ALL=1`` (``make test-s3-all``).

A plain module (no pytest import at load), so the unit tests check the rule itself.
"""
from __future__ import annotations

from collections.abc import Mapping

from phoenix_lab.s3 import servers_wanted

# The fixtures whose parameter is a lab S3 server: the cluster layer's, the e2e layer's.
LAB_PARAMS = ("lab_s3_server", "e2e")
# The e2e layer's one parameter on a cluster the suite did not start (PHOENIX_E2E_KUBECONFIG):
# its S3 server is whatever PHOENIX_E2E_S3_ENDPOINT names.
EXTERNAL = "external"
MARKER = "all_s3_servers"
FULL = "full"


def _on(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "") in ("1", "true")


def servers(env: Mapping[str, str]) -> list[str]:
    """The servers this run parametrizes over (ValueError for an unknown name)."""
    return servers_wanted(env.get("PHOENIX_S3_SERVERS"))


def e2e_params(env: Mapping[str, str]) -> list[str]:
    """The e2e layer's servers: the lab's, or the one of an external cluster."""
    return [EXTERNAL] if env.get("PHOENIX_E2E_KUBECONFIG") else servers(env)


def deselected(params: Mapping[str, object], markers: set[str], env: Mapping[str, str]) -> bool:
    """Whether a collected test with these fixture ``params`` and ``markers`` is left out."""
    if FULL in markers and not _on(env, "PHOENIX_FULL"):
        return True
    rest = servers(env)[1:]  # every server but the first
    if params.get("s3_server") in rest and "slow" in markers:
        return not _on(env, "PHOENIX_S3_SLOW_ON_ALL")
    if any(params.get(name) in rest for name in LAB_PARAMS):
        return MARKER not in markers and not _on(env, "PHOENIX_LAB_S3_ON_ALL")
    return False
