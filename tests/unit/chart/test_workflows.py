"""The GitHub workflows parse, pass actionlint (with shellcheck where installed) and reference
files that exist; the release workflow publishes only after its checks, from variables (no
registry host written down), with the tags phoenix_lab.release computes; the kind workflow
builds and installs the way the release does."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from phoenix_lab import release

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yaml"))


def test_there_is_a_kind_e2e_workflow_and_a_release_workflow():
    assert {"e2e-kind.yaml", "release.yaml"} <= {w.name for w in WORKFLOWS}


def load(name: str) -> dict:
    return yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_parses_with_triggers_and_jobs(workflow):
    doc = yaml.safe_load(workflow.read_text())
    # YAML 1.1 reads the key `on` as True.
    assert doc.get(True) or doc.get("on")
    assert doc["jobs"] and all(job.get("steps") for job in doc["jobs"].values())


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


# --- release.yaml ----------------------------------------------------------------------


def runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def uses(job: dict, action: str) -> list[dict]:
    return [step for step in job["steps"] if step.get("uses", "").startswith(action + "@")]


def needs(jobs: dict, name: str) -> set[str]:
    """Every job ``name`` waits for, directly or not."""
    direct = jobs[name].get("needs", [])
    direct = [direct] if isinstance(direct, str) else direct
    return set(direct).union(*(needs(jobs, d) for d in direct))


def test_release_runs_on_a_version_tag_or_by_hand():
    on = load("release.yaml")[True]
    assert on["push"] == {"tags": ["v*"]}
    assert on["workflow_dispatch"]["inputs"]["tag"]["required"] is True


def test_release_publishes_nothing_before_the_version_check_and_the_unit_tests():
    jobs = load("release.yaml")["jobs"]
    check = runs(jobs["check"])
    assert 'phoenix_lab.release check --tag "$TAG"' in check
    assert "pytest -m unit tests/unit" in check
    assert "push" not in check and not uses(jobs["check"], "docker/build-push-action")
    pushing = [name for name, job in jobs.items()
               if uses(job, "docker/build-push-action") or "helm push" in runs(job)]
    assert set(pushing) == {"operator-image", "trainer-image", "chart"}
    for name in pushing:
        assert "check" in needs(jobs, name), name
    assert {"operator-image", "trainer-image"} <= needs(jobs, "chart")


def test_release_registry_comes_from_a_variable_never_a_written_host():
    doc = load("release.yaml")
    assert doc["env"]["REGISTRY"] == "${{ vars.IMAGE_REGISTRY }}"
    jobs = doc["jobs"]
    logins = [s for j in jobs.values() for s in uses(j, "docker/login-action")]
    assert logins and all(s["with"]["registry"] == "${{ env.REGISTRY }}" for s in logins)
    builds = [s for j in jobs.values() for s in uses(j, "docker/build-push-action")]
    assert builds and all(s["with"]["tags"].startswith("${{") for s in builds)
    # Image refs are made by phoenix_lab.release from a prefix built from $REGISTRY.
    assert 'prefix=${REGISTRY%/}/${GITHUB_REPOSITORY_OWNER,,}' in runs(jobs["check"])
    assert 'helm push "dist/phoenix-$VERSION.tgz" "oci://$PREFIX/charts"' in runs(jobs["chart"])
    # No host name (word.word/...) anywhere outside comments, expressions and action names.
    code = "\n".join(line.split(" #")[0] for line in
                      (REPO / ".github/workflows/release.yaml").read_text().splitlines()
                      if not line.lstrip().startswith("#"))
    code = re.sub(r"\$\{\{.*?\}\}|uses: \S+", "", code)
    assert re.findall(r"\b[a-z0-9-]+(?:\.[a-z0-9-]+)+(?::\d+)?/", code) == []


def test_release_outputs_are_the_ones_phoenix_lab_release_prints(capsys):
    jobs = load("release.yaml")["jobs"]
    assert release.main(["tags", "--prefix", "registry.invalid/acme"]) == 0
    printed = {line.split("=", 1)[0] for line in capsys.readouterr().out.splitlines()}
    outputs = jobs["check"]["outputs"]
    from_tags = {v[len("${{ steps.tags.outputs."):-3] for v in outputs.values()
                 if v.startswith("${{ steps.tags.outputs.")}
    assert from_tags and from_tags <= printed
    used = set(re.findall(r"needs\.check\.outputs\.([\w-]+)",
                          (REPO / ".github/workflows/release.yaml").read_text()))
    assert used and used <= set(outputs)


def test_release_builds_both_trainer_variants_with_the_locked_torch():
    job = load("release.yaml")["jobs"]["trainer-image"]
    assert job["strategy"]["matrix"]["variant"] == ["cuda", "cpu"]
    (build,) = uses(job, "docker/build-push-action")
    assert build["with"]["file"] == "trainer_image/Dockerfile"
    args = dict(line.split("=", 1) for line in build["with"]["build-args"].splitlines())
    assert args["TORCH_VARIANT"] == "${{ matrix.variant }}"
    assert args["TORCH_VERSION"] == "${{ needs.check.outputs.torch }}"
    assert "env.TORCH_CPU_INDEX_URL" in args["TORCH_INDEX_URL"]
    assert load("release.yaml")["env"]["TORCH_CPU_INDEX_URL"] == "${{ vars.TORCH_CPU_INDEX_URL }}"


def test_release_chart_defaults_to_the_pushed_operator_image():
    chart = runs(load("release.yaml")["jobs"]["chart"])
    at = chart.index("phoenix_lab.release chart-image")
    assert at < chart.index("helm package charts/phoenix") < chart.index("helm push")
    assert '--repository "$PREFIX/phoenix-operator"' in chart


def test_kind_workflow_builds_and_installs_the_way_the_release_does():
    steps = load("e2e-kind.yaml")["jobs"]["e2e"]["steps"]
    text = "\n".join(s.get("run", "") for s in steps)
    assert "python -m phoenix_lab.release check" in text
    assert 'OPERATOR_IMAGE=phoenix-operator:$VERSION' in text  # the chart's default tag
    assert '--build-arg TORCH_VERSION="$TORCH_VERSION"' in text
    assert '--build-arg TORCH_VARIANT="$variant"' in text
    (install,) = [s["run"] for s in steps if "helm install" in s.get("run", "")]
    assert "helm package charts/phoenix" in install and '"dist/phoenix-$VERSION.tgz"' in install
    assert "image.tag" not in install and "image.repository" not in install
