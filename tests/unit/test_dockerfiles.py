"""Structure of the two Dockerfiles, since no container engine runs here (the kind workflow
builds them for real): non-root final USER, COPY sources that exist in the build context
(the repo root) and are not dockerignored, multi-stage operator image without torch, and
the operator's COPY set really is enough to build and import the operator."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "Dockerfile"
TRAINER = REPO / "trainer_image" / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Dockerfile -> (global ARG defaults, stages). Enough for structure checks: line
    continuations, comments, `FROM image AS name`, ARG substitution in FROM."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        op, _, rest = line.strip().partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)),
                          rest.split()[0] if not rest.startswith("--") else rest.split()[1])
            m = re.search(r"\s+AS\s+(\S+)\s*$", rest, re.IGNORECASE)
            stages.append(Stage(base, m.group(1) if m else None))
        elif op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif stages:
            stages[-1].instructions.append((op, rest))
    return args, stages


def copy_sources(stage: Stage) -> list[str]:
    """Sources of the stage's COPY/ADD from the build context (not --from=another stage)."""
    out = []
    for op in ("COPY", "ADD"):
        for arg in stage.all(op):
            if "--from=" in arg:
                continue
            if arg.startswith("["):
                import json
                parts = json.loads(arg)
            else:
                parts = [p for p in arg.split() if not p.startswith("--")]
            out += parts[:-1]
    return out


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path.rstrip("/")).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pat.rstrip("/")) or
               (pat.startswith("**/") and fnmatch.fnmatch(Path(prefix).name, pat[3:]))
               for pat in patterns if not pat.startswith("!") for prefix in prefixes)


def final_user(stage: Stage) -> str:
    users = stage.all("USER")
    assert users, "the final stage sets no USER: the container would run as root"
    return users[-1]


def dockerfiles() -> list:
    params = [pytest.param(OPERATOR, id="operator")]
    params.append(pytest.param(TRAINER, id="trainer", marks=pytest.mark.skipif(
        not TRAINER.exists(), reason="trainer_image/Dockerfile not written yet (trainer engineer)")))
    return params


@pytest.mark.parametrize("dockerfile", dockerfiles())
def test_final_stage_runs_as_a_numeric_non_root_user(dockerfile):
    _, stages = parse(dockerfile)
    user = final_user(stages[-1]).split(":")[0]
    # numeric, so the kubelet can enforce runAsNonRoot without reading /etc/passwd
    assert user.isdigit() and int(user) != 0, f"USER {user!r} must be a non-zero uid"


@pytest.mark.parametrize("dockerfile", dockerfiles())
def test_copy_sources_exist_and_are_not_dockerignored(dockerfile):
    _, stages = parse(dockerfile)
    sources = [s for st in stages for s in copy_sources(st)]
    assert sources, "nothing is copied from the build context"
    for src in sources:
        assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} does not exist in the repo"
        assert not dockerignored(src), f"{dockerfile.name}: COPY {src} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", dockerfiles())
def test_copy_from_names_an_earlier_stage(dockerfile):
    _, stages = parse(dockerfile)
    for i, stage in enumerate(stages):
        for arg in stage.all("COPY"):
            m = re.search(r"--from=(\S+)", arg)
            if m:
                assert m.group(1) in {s.name for s in stages[:i]}, f"COPY --from={m.group(1)}"


def test_operator_image_is_multi_stage_on_a_slim_base():
    _, stages = parse(OPERATOR)
    assert len(stages) >= 2 and all(s.name for s in stages)
    assert all("slim" in s.base or "distroless" in s.base for s in stages), \
        [s.base for s in stages]
    runtime = stages[-1]
    # the runtime gets the built venv, never the sources or a compiler
    assert any("--from=" + stages[0].name in a for a in runtime.all("COPY"))
    assert not runtime.all("RUN"), "the runtime stage should not install anything"
    assert runtime.all("ENTRYPOINT") or runtime.all("CMD")


def test_operator_image_installs_only_the_operator_extra():
    _, stages = parse(OPERATOR)
    installs = [r for st in stages for r in st.all("RUN") if "pip install" in r]
    assert installs, "no pip install"
    for run in installs:
        targets = re.findall(r"pip install\s+([^&;]+)", run)
        for target in targets:
            assert target.strip().strip('"\'') == ".[operator]", target
    text = OPERATOR.read_text()
    # "torch" may appear only in comments and the build-time guard that checks it is absent
    code = [line for line in text.splitlines()
            if "torch" in line and not line.lstrip().startswith("#")
            and "not in sys.modules" not in line and "pip show torch" not in line
            and "must not be in" not in line]
    assert code == []


def test_operator_package_builds_from_exactly_the_copied_sources(tmp_path):
    """Recreate the build stage's context and build the wheel `pip install .[operator]`
    would install: the COPY set is complete, and the operator imports without torch."""
    _, stages = parse(OPERATOR)
    ctx = tmp_path / "ctx"
    for src in copy_sources(stages[0]):
        dst = ctx / src
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / src, dst)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
         "print(b.build_wheel(sys.argv[1]))", str(dist)],
        cwd=ctx, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("*.whl")
    site = tmp_path / "site"
    shutil.unpack_archive(wheel, site, "zip")
    assert (site / "phoenix_operator" / "main.py").exists()
    assert not (site / "phoenix_lab").exists(), "lab code does not belong in the operator image"
    # torch and numpy blocked: importing them would raise ImportError
    probe = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; "
             f"sys.path.insert(0, {str(site)!r}); import phoenix_operator.main as m; "
             f"assert m.__file__.startswith({str(site)!r}), m.__file__")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_dockerignore_keeps_local_state_out_of_the_context():
    for path in (".venv", ".git", ".lab", "tests/unit", "operator/phoenix_operator/__pycache__"):
        assert dockerignored(path), path
    for path in ("operator/phoenix_operator/main.py", "pyproject.toml", "examples/train_mlp.py"):
        assert not dockerignored(path), path
