"""The GitHub workflows pass actionlint and reference files that exist."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yaml"))


def test_there_is_a_kind_e2e_workflow():
    assert "e2e-kind.yaml" in {w.name for w in WORKFLOWS}


def test_actionlint_passes():
    from phoenix_lab.paths import bin_dir

    binary = next((str(p) for p in (bin_dir() / "actionlint", shutil.which("actionlint"))
                   if p and Path(p).is_file()), None)
    if binary is None:
        pytest.skip("actionlint not installed (go install github.com/rhysd/actionlint/cmd/"
                    "actionlint@latest with GOBIN=~/.cache/phoenix/bin)")
    proc = subprocess.run([binary, "-no-color", *map(str, WORKFLOWS)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_referenced_repo_files_exist(workflow):
    text = workflow.read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:tests|charts|trainer_image|crds)/[\w./-]+\.ya?ml"
                           r"|(?:trainer_image/)?Dockerfile)\b", text))
    assert paths
    missing = [p for p in paths if "*" not in p and not (REPO / p).exists()]
    assert missing == []
