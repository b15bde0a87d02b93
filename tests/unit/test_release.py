"""lab/phoenix_lab/release.py: image tags from the real uv.lock and from synthetic locks
(old `-cu12` wheels, CUDA 13's `cuda-toolkit[cudart]`, decoys outside torch's closure, CPU-only
and ambiguous locks), the version check on copies of the repository's files, the chart's
default image against what the release publishes (helm template), and the CLI's output."""
from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from phoenix_lab import release
from phoenix_lab.release import Locked, ReleaseError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def lock(*packages: str) -> str:
    return 'version = 1\nrequires-python = ">=3.11"\n\n' + "\n".join(packages)


def pkg(name: str, version: str, deps: str = "", optional: str = "") -> str:
    text = f'[[package]]\nname = "{name}"\nversion = "{version}"\n'
    text += 'source = { registry = "default" }\n'
    if deps:
        text += f"dependencies = [\n{deps}\n]\n"
    if optional:
        text += f"\n[package.optional-dependencies]\n{optional}\n"
    return text + "\n"


CU12_TORCH = pkg("torch", "2.8.0", deps=(
    '    { name = "filelock" },\n'
    "    { name = \"nvidia-cuda-runtime-cu12\", marker = \"sys_platform == 'linux'\" },"))
CU12_RUNTIME = pkg("nvidia-cuda-runtime-cu12", "12.8.90")

CU13_TORCH = pkg("torch", "2.15.0", deps=(
    '    { name = "cuda-toolkit", extra = ["cublas", "cudart"], '
    "marker = \"sys_platform == 'linux'\" },\n"
    '    { name = "nvidia-cudnn-cu13" },'))
CU13_TOOLKIT = pkg("cuda-toolkit", "13.2.2", optional=(
    'cublas = [\n    { name = "nvidia-cublas" },\n]\n'
    'cudart = [\n    { name = "nvidia-cuda-runtime" },\n]\n'
    'nvrtc = [\n    { name = "nvidia-cuda-runtime-cu11" },\n]'))
CU13_RUNTIME = pkg("nvidia-cuda-runtime", "13.2.86")


def test_tags_of_an_old_style_lock_come_from_the_cu12_runtime_wheel():
    text = lock(CU12_TORCH, CU12_RUNTIME, pkg("filelock", "3.20.0"))
    assert release.locked(text) == Locked(torch="2.8.0", cuda="12.8")


def test_cuda_13_runtime_is_found_through_the_toolkit_extra_torch_asks_for():
    # The toolkit's nvrtc extra (not asked for by torch) names a cu11 runtime: ignored.
    text = lock(CU13_TORCH, CU13_TOOLKIT, CU13_RUNTIME, pkg("nvidia-cuda-runtime-cu11", "11.8.89"),
                pkg("nvidia-cublas", "13.1.0.3"), pkg("nvidia-cudnn-cu13", "9.26.0.51"))
    assert release.locked(text) == Locked(torch="2.15.0", cuda="13.2")


def test_a_cuda_runtime_outside_torchs_dependencies_does_not_decide_the_tag():
    other = pkg("cupy-cuda11x", "13.0.0", deps='    { name = "nvidia-cuda-runtime-cu11" },')
    text = lock(CU12_TORCH, CU12_RUNTIME, other, pkg("nvidia-cuda-runtime-cu11", "11.8.89"))
    assert release.locked(text).cuda == "12.8"


def test_a_cpu_only_lock_has_no_cuda_tag():
    with pytest.raises(ReleaseError, match="0 CUDA runtime wheels"):
        release.locked(lock(pkg("torch", "2.9.0", deps='    { name = "filelock" },'),
                            pkg("filelock", "3.20.0")))


def test_a_lock_with_two_torch_versions_is_refused():
    with pytest.raises(ReleaseError, match="2 versions of torch"):
        release.locked(lock(CU12_TORCH, pkg("torch", "2.9.0"), CU12_RUNTIME))


def test_the_real_lock_gives_torch_and_its_cuda_runtime():
    text = (REPO / "uv.lock").read_text()
    got = release.locked(text)
    packages = {p["name"]: p["version"] for p in tomllib.loads(text)["package"]}
    assert got.torch == packages["torch"]
    runtimes = {n: v for n, v in packages.items() if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", n)}
    assert got.cuda in {".".join(v.split(".")[:2]) for v in runtimes.values()}
    assert re.fullmatch(r"\d+\.\d+", got.cuda)
    # The trainer extra's floor (pyproject.toml) holds for what the tag names.
    floor = re.search(r'"torch>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    as_tuple = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:2])  # noqa: E731
    assert as_tuple(got.torch) >= as_tuple(floor)


def test_image_tags_per_variant():
    tags = release.image_tags("1.2.3", Locked(torch="2.15.0", cuda="13.2"))
    assert tags == {
        "operator": ["1.2.3"],
        "trainer-cuda": ["1.2.3", "1.2.3-torch2.15.0-cuda13.2"],
        "trainer-cpu": ["1.2.3-cpu", "1.2.3-torch2.15.0-cpu"],
    }
    refs = release.image_refs("my.registry.invalid/acme/", tags)
    assert refs["operator"] == ["my.registry.invalid/acme/phoenix-operator:1.2.3"]
    assert refs["trainer-cpu"][0] == "my.registry.invalid/acme/phoenix-trainer:1.2.3-cpu"


def test_a_version_docker_cannot_tag_is_refused():
    with pytest.raises(ReleaseError, match="not valid image tags"):
        release.image_tags("1.2.3+local", Locked(torch="2.15.0", cuda="13.2"))


@pytest.fixture
def checkout(tmp_path) -> Path:
    """The files the version check reads, copied from this repository."""
    for rel in ("pyproject.toml", "uv.lock", "charts/phoenix/Chart.yaml",
                "charts/phoenix/values.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    return tmp_path


def test_this_repository_is_consistent():
    assert release.version_problems(None) == []
    assert release.version_problems(f"v{release.project_version()}") == []


def test_a_tag_other_than_the_version_is_refused(checkout):
    version = release.project_version(checkout)
    assert release.version_problems(f"v{version}", checkout) == []
    (problem,) = release.version_problems("v99.0.0", checkout)
    assert "tag v99.0.0" in problem
    (problem,) = release.version_problems(version, checkout)  # the leading v is part of it
    assert "is not v" in problem


@pytest.mark.parametrize("key", ["version", "appVersion"])
def test_a_chart_version_other_than_the_project_version_is_refused(checkout, key):
    chart = checkout / "charts/phoenix/Chart.yaml"
    text = chart.read_text()
    chart.write_text(re.sub(rf"(?m)^{key}: .*$", f'{key}: "9.9.9"', text, count=1))
    problems = release.version_problems(None, checkout)
    assert any(f"Chart.yaml {key} is '9.9.9'" in p for p in problems)
    # appVersion is also the operator image's default tag, which then is not the released one.
    assert len(problems) == (2 if key == "appVersion" else 1)


def test_a_default_image_tag_the_release_does_not_publish_is_refused(checkout):
    values = checkout / "charts/phoenix/values.yaml"
    values.write_text(values.read_text().replace('  tag: ""', "  tag: latest", 1))
    (problem,) = release.version_problems(None, checkout)
    assert "'latest'" in problem


def test_a_stale_or_missing_lock_is_refused(checkout):
    py = checkout / "pyproject.toml"
    version = release.project_version(checkout)
    py.write_text(py.read_text().replace(f'version = "{version}"', 'version = "9.9.9"', 1))
    chart = checkout / "charts/phoenix/Chart.yaml"
    chart.write_text(chart.read_text().replace(version, "9.9.9"))
    (problem,) = release.version_problems("v9.9.9", checkout)
    assert "uv.lock was made for phoenix-jobs" in problem
    (checkout / "uv.lock").unlink()
    (problem,) = release.version_problems("v9.9.9", checkout)
    assert "uv.lock is missing" in problem


def test_chart_image_changes_only_the_repository_line():
    text = (REPO / "charts/phoenix/values.yaml").read_text()
    new = release.set_chart_image(text, "my.registry.invalid/acme/phoenix-operator")
    changed = [(a, b) for a, b in zip(text.splitlines(), new.splitlines()) if a != b]
    assert changed == [("  repository: phoenix-operator",
                        "  repository: my.registry.invalid/acme/phoenix-operator")]
    assert len(new.splitlines()) == len(text.splitlines())
    with pytest.raises(ReleaseError, match="no `image:` block"):
        release.set_chart_image("replicaCount: 2\n", "x/y")


def helm_binary() -> str:
    from phoenix_lab.paths import bin_dir

    for candidate in (bin_dir() / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("helm not found (build the lab binaries: bash lab/build-binaries.sh)")


def rendered_operator_image(chart: Path) -> str:
    out = subprocess.run([helm_binary(), "template", "phx", str(chart)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    (deploy,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return container["image"]


def test_the_published_chart_runs_the_operator_image_the_release_pushes(tmp_path):
    """What the workflow does: tags from the lock, then chart-image on a copy of the chart."""
    chart = tmp_path / "charts" / "phoenix"
    shutil.copytree(REPO / "charts" / "phoenix", chart)
    for rel in ("pyproject.toml", "uv.lock"):
        shutil.copy(REPO / rel, tmp_path / rel)
    version = release.project_version(tmp_path)
    refs = release.image_refs("my.registry.invalid/acme",
                              release.image_tags(version, release.locked((tmp_path / "uv.lock").read_text())))
    # The chart as it is in the repository: the repository's default name, the released tag.
    assert rendered_operator_image(chart) == f"phoenix-operator:{version}"
    assert release.main(["--repo", str(tmp_path), "chart-image", "--repository",
                         refs["operator"][0].rsplit(":", 1)[0]]) == 0
    assert [rendered_operator_image(chart)] == refs["operator"]


def test_cli_prints_step_outputs_and_exits_non_zero_on_a_bad_tag(capsys):
    assert release.main(["tags", "--prefix", "my.registry.invalid/acme"]) == 0
    out = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    lock_ = release.locked((REPO / "uv.lock").read_text())
    assert out["torch"] == lock_.torch and out["cuda"] == lock_.cuda
    assert out["trainer-cuda"].split(",")[1].endswith(f"-torch{lock_.torch}-cuda{lock_.cuda}")
    assert set(out) == {"version", "torch", "cuda", "operator", "trainer-cuda", "trainer-cpu"}
    assert release.main(["check", "--tag", "v0.0.0-not-this"]) == 1
    assert "is not v" in capsys.readouterr().err


def test_cli_refuses_a_folder_that_is_not_a_checkout(tmp_path, capsys):
    assert release.main(["--repo", str(tmp_path), "tags"]) == 2
    assert "not a Phoenix checkout" in capsys.readouterr().err
