"""What `pip install phoenix-jobs[...]` installs: the runtime wheel holds the operator and the
trainer and nothing of the repository's own tooling (the lab, tests, benchmarks), its names
are ours (not `phoenix`), and the trainer's interpreter-start hook installs with one command
into any environment (phoenix_trainer.starthook), where a new interpreter then runs it."""
from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from phoenix_trainer import starthook

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LAB_PROJECT = tomllib.loads((REPO / "lab" / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel setuptools builds from a copy of the whole checkout (everything but .git
    and local state), the way `pip wheel .` or a release would."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns(".git", ".venv", ".lab", "__pycache__", "*.egg-info",
                                    "build", "dist", ".pytest_cache")
    shutil.copytree(REPO, src, ignore=ignore)
    build = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
         "print(b.build_wheel(sys.argv[1]))", str(tmp / "dist")],
        cwd=src, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-2000:]
    (path,) = (tmp / "dist").glob("*.whl")
    with zipfile.ZipFile(path) as z:
        yield z


def test_the_wheel_holds_the_operator_and_the_trainer_only(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    packages = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    assert packages == {"phoenix_operator", "phoenix_trainer"}, packages
    names = wheel.namelist()
    assert not [n for n in names if "phoenix_lab" in n or n.startswith(("tests/", "benchmarks/"))]
    assert not [n for n in names if n.endswith(".pth")], "the start hook is installed on purpose, not by pip"


def test_the_wheel_is_called_phoenix_jobs_and_installs_our_commands(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    msg = email.message_from_bytes(wheel.read(meta))
    assert msg["Name"] == "phoenix-jobs"
    assert not [r for r in msg.get_all("Requires-Dist") or [] if "lab" in r.split(";")[0]]
    (ep,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    scripts = wheel.read(ep).decode()
    scripts = {line.split("=")[0].strip() for line in scripts.split("[console_scripts]")[1].splitlines()
               if "=" in line and not line.startswith("[")}
    assert scripts == {"phoenixctl", "kubectl-phoenix", "phoenix-trainer-hook"}, scripts


def test_the_lab_is_a_distribution_of_its_own_for_the_repository_only():
    assert LAB_PROJECT["name"] == "phoenix-jobs-lab"
    assert LAB_PROJECT["scripts"] == {"phoenix-lab": "phoenix_lab.cli:main"}
    assert not any("lab" in extra for extra in PROJECT["optional-dependencies"])
    dev_group = tomllib.loads((REPO / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    assert "phoenix-jobs-lab" in dev_group


# --- the start hook ------------------------------------------------------------------------


def _interpreter_with(site_dir: Path, spool: Path, code: str) -> subprocess.CompletedProcess:
    """A new interpreter that reads ``site_dir``'s .pth files the way ``site`` reads
    site-packages at start-up, then runs ``code``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHOENIX_")}
    env["PHOENIX_SPOOL_DIR"] = str(spool)
    env["PHOENIX_TERMINATION_LOG"] = str(site_dir / "termination-log")
    return subprocess.run(
        [sys.executable, "-c", f"import site, sys; site.addsitedir({str(site_dir)!r}); {code}"],
        env=env, capture_output=True, text=True, timeout=60)


def test_hook_command_installs_a_hook_that_runs_at_interpreter_start(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    assert starthook.main(["--site-dir", str(site_dir), "--check"]) == 1
    assert starthook.main(["--site-dir", str(site_dir)]) == 0
    assert starthook.main(["--site-dir", str(site_dir), "--check"]) == 0
    assert (site_dir / "phoenix-preflight.pth").read_text().count("\n") == 1  # one line
    ok = _interpreter_with(site_dir, tmp_path / "spool",
                           "print('prefetch' if 'phoenix_trainer.prefetch' in sys.modules else 'none')")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "prefetch"
    assert (tmp_path / "spool").is_dir()  # preflight made and tried the spool


def test_hook_stops_an_interpreter_whose_spool_cannot_be_written(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    starthook.install(site_dir)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    bad = _interpreter_with(site_dir, blocker / "spool", "print('script ran')")
    assert bad.returncode == 1 and "script ran" not in bad.stdout
    assert "PHOENIX_SPOOL_DIR" in bad.stderr
    assert "PHOENIX_SPOOL_DIR" in (site_dir / "termination-log").read_text()  # the pod says why


def test_no_hook_without_the_command(tmp_path):
    """Installing the package writes no hook: a developer's environment or the operator's
    image must not run the trainer's preflight (the wheel test shows there is no .pth)."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    assert not starthook.installed(site_dir)
    plain = _interpreter_with(site_dir, tmp_path / "not-a-dir" / "spool", "print('ran')")
    assert plain.returncode == 0 and plain.stdout.strip() == "ran"
