"""The revision tests/e2e/upgrade-from names can stand for "the previous release" of
`make test-upgrade`: it is an ancestor of this checkout, has the operator Dockerfile, chart
and CRD that test installs, and shares the trainer contract with this checkout, since the
upgrade test drives this checkout's trainer image with its operator. The contract may grow
(a new env name, a new fence field, a new role: an older operator never sets them), but a
name or value the old operator uses that this checkout changed or dropped fails here, in
`make test`, until upgrade-from moves to a revision that has it."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from e2e.phoenix_e2e import upgrade_from

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
# What operator and trainer must agree on (docs/install.md section 7, "What changes").
CONTRACT = ("trainer_image/phoenix_trainer/core/contract.py",
            "trainer_image/phoenix_trainer/core/handshake.py")
LAYOUT = "trainer_image/phoenix_trainer/core/layout.py"


@pytest.fixture(scope="module")
def commit() -> str:
    found = upgrade_from(REPO)
    if found is None:
        pytest.skip("tests/e2e/upgrade-from names a commit this shallow clone lacks")
    return found


def _show(commit: str, path: str) -> str:
    got = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"],
                         capture_output=True, text=True)
    assert got.returncode == 0, f"{commit[:12]} has no {path}: {got.stderr.strip()}"
    return got.stdout


def test_the_previous_revision_is_an_ancestor_with_what_the_upgrade_installs(commit):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert commit != head, "upgrading from HEAD to itself tests nothing"
    ancestor = subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"])
    assert ancestor.returncode == 0, f"{commit[:12]} is not an ancestor of HEAD"
    for path in ("Dockerfile", "charts/phoenix/Chart.yaml", "charts/phoenix/ci/lab-values.yaml",
                 "charts/phoenix/crds/phoenixjobs.yaml"):
        assert _show(commit, path)


def _contract(source: str) -> dict[str, object]:
    """What a contract module promises: its module-level constants (env names, defaults) by
    value, and each class's fields (the fence's, the termination message's) by name."""
    found: dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            found.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    found[f"{node.name}.{item.target.id}"] = "field"
    return found


def test_the_contract_reader_sees_constants_and_fields():
    got = _contract('ENV_A = "PHOENIX_A"\nN = 3\nclass Fence:\n    attempt: int\n    pod: str = ""\n')
    assert got == {"ENV_A": "PHOENIX_A", "N": 3, "Fence.attempt": "field", "Fence.pod": "field"}


def test_the_previous_revision_shares_the_trainer_contract(commit):
    for path in CONTRACT:
        old, new = _contract(_show(commit, path)), _contract((REPO / path).read_text())
        assert old, f"{commit[:12]}:{path} declares no contract"
        changed = {k: (v, new.get(k, "<gone>")) for k, v in old.items() if new.get(k, "<gone>") != v}
        assert not changed, (f"{path} changed what the operator of {commit[:12]} relies on "
                             f"(old, now): {changed}; move tests/e2e/upgrade-from forward")
    version = re.compile(r"^FORMAT_VERSION = (\d+)$", re.M)
    supported = re.compile(r"^SUPPORTED_FORMAT_VERSIONS = \(([\d, ]+)\)$", re.M)
    current = int(version.search((REPO / LAYOUT).read_text()).group(1))
    old_reader = {int(v) for v in supported.search(_show(commit, LAYOUT)).group(1).split(",") if v.strip()}
    assert current in old_reader, \
        f"the operator of {commit[:12]} reads manifest formats {old_reader}, not {current}"
