"""Structure of the two Dockerfiles, the fast checks beside the real builds (the lab builds
and runs both images with lab/phoenix_lab/images.py; the kind workflow too): non-root final
USER, COPY sources that exist in the build context (the repo root) and are not dockerignored,
the base image as a build argument, dependency layers that depend on pyproject.toml only,
bytecode compiled at build time, a multi-stage operator image without torch that starts as
any uid, and the operator's COPY set really is enough to build and import the operator."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
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
USER_IMAGE = REPO / "examples" / "user-image" / "Dockerfile"


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
    build = next(s for s in stages if install_runs(s))
    assert any("--from=" + build.name in a for a in runtime.all("COPY"))
    assert not runtime.all("RUN"), "the runtime stage should not install anything"
    assert runtime.all("ENTRYPOINT") or runtime.all("CMD")


def env_of(stage: Stage, before: int | None = None) -> dict[str, str]:
    """The stage's ENV settings (of its first ``before`` instructions)."""
    out: dict[str, str] = {}
    for op, arg in stage.instructions[:before]:
        if op == "ENV":
            for word in shlex.split(arg):
                name, _, value = word.partition("=")
                out[name] = value
    return out


def install_runs(stage: Stage) -> list[tuple[int, str]]:
    return [(i, arg) for i, (op, arg) in enumerate(stage.instructions)
            if op == "RUN" and "pip install" in arg]


def test_operator_image_installs_only_the_operator_extra():
    _, stages = parse(OPERATOR)
    installs = [r for st in stages for _, r in install_runs(st)]
    assert installs, "no pip install"
    for run in installs:
        for target in re.findall(r"pip install\s+([^&;]+)", run):
            target = target.strip()
            # the dependency layer: requirements derived from pyproject.toml; the package
            # itself: no dependencies of its own choosing
            assert target.startswith("-r ") or target.startswith("--no-deps"), target
    derive = " ".join(run for st in stages for run in st.all("RUN") if "tomllib" in run)
    assert "['operator']" in derive and "['trainer']" not in derive and "[trainer]" not in derive
    text = OPERATOR.read_text()
    # "torch" may appear only in comments and the build-time guard that checks it is absent
    code = [line for line in text.splitlines()
            if "torch" in line and not line.lstrip().startswith("#")
            and "not in sys.modules" not in line and "pip show torch" not in line
            and "must not be in" not in line]
    assert code == []


@pytest.mark.parametrize("dockerfile", dockerfiles())
def test_base_image_is_a_build_argument_without_a_registry(dockerfile):
    """The lab passes its debootstrapped base (PYTHON_IMAGE=phoenix-python-base:bookworm);
    the default is an official image's short name, no registry host."""
    args, stages = parse(dockerfile)
    raw = [line.split()[1] for line in dockerfile.read_text().splitlines()
           if line.upper().startswith("FROM ")]
    assert raw and all(r == "${PYTHON_IMAGE}" for r in raw), raw
    default = args.get("PYTHON_IMAGE", "")
    assert default.startswith("python:") and "/" not in default, default


@pytest.mark.parametrize("dockerfile", dockerfiles())
def test_no_syntax_directive(dockerfile):
    # "# syntax=docker/dockerfile:1" makes BuildKit pull its frontend from a registry; the
    # daemon's built-in frontend must do (nothing can be pulled in the lab).
    assert not re.search(r"^#\s*syntax\s*=", dockerfile.read_text(), re.MULTILINE | re.IGNORECASE)


@pytest.mark.parametrize("dockerfile", dockerfiles())
def test_dependencies_layer_depends_on_the_dependency_list_only(dockerfile):
    """Code edits must not re-download dependencies (torch: gigabytes), and neither must an
    edit of pyproject.toml that leaves the dependencies alone (a pytest marker, a version):
    a `requirements` stage copies pyproject.toml alone and derives the list with tomllib; the
    stage that installs copies only that list before the install, and the code after it,
    with --no-deps, into a venv at /opt/venv (Debian's python refuses system installs)."""
    _, stages = parse(dockerfile)
    requirements = next(s for s in stages if s.name == "requirements")
    assert copy_sources(requirements) == ["pyproject.toml"]
    assert any("tomllib" in run for run in requirements.all("RUN"))
    stage = next(s for s in stages if install_runs(s))
    runs = install_runs(stage)
    assert len(runs) >= 2, runs
    deps_at, deps = runs[0]
    assert "-r " in deps, deps
    copied_before = [arg for op, arg in stage.instructions[:deps_at] if op in ("COPY", "ADD")]
    assert len(copied_before) == 1 and "--from=requirements" in copied_before[0], copied_before
    code_at, code = runs[-1]
    assert code_at > deps_at and "--no-deps" in code, code
    assert any("python -m venv /opt/venv" in arg for op, arg in stage.instructions if op == "RUN")
    assert env_of(stages[-1])["PATH"].startswith("/opt/venv/bin:")


@pytest.mark.parametrize("dockerfile", dockerfiles())
def test_bytecode_is_compiled_at_build_time(dockerfile):
    """The root filesystem is read-only at run time: .pyc files come from the build. pip
    compiles what it installs; PYTHONDONTWRITEBYTECODE may be set for the runtime, but not
    (stage-wide) where pip runs, and never --no-compile."""
    _, stages = parse(dockerfile)
    for stage in stages:
        for at, run in install_runs(stage):
            assert "--no-compile" not in run and "PIP_NO_COMPILE" not in run
            assert env_of(stage, at).get("PYTHONDONTWRITEBYTECODE") in (None, "", "0"), \
                f"PYTHONDONTWRITEBYTECODE set before: {run[:60]}"


@pytest.mark.parametrize("dockerfile", dockerfiles())
def test_runs_without_a_passwd_entry_for_its_uid(dockerfile):
    """kopf (getpass.getuser) and torch's caches ask who the user is: USER/LOGNAME answer
    for any uid a pod runs as; HOME points into /tmp, the writable emptyDir."""
    _, stages = parse(dockerfile)
    env = env_of(stages[-1])
    assert env.get("USER") and env.get("LOGNAME"), env
    assert env.get("HOME", "").startswith("/tmp"), env


def test_operator_image_has_a_passwd_entry_for_its_uid():
    _, stages = parse(OPERATOR)
    uid, _, gid = final_user(stages[-1]).partition(":")
    build = next(s for s in stages if s.name == "build")
    assert any(f"useradd --uid {uid} --gid {gid}" in arg for op, arg in build.instructions
               if op == "RUN"), "the build stage must create the runtime's user"
    assert any(f"--from={build.name}" in arg and "/etc/passwd" in arg and "/etc/group" in arg
               for arg in stages[-1].all("COPY"))


@pytest.mark.skipif(not TRAINER.exists(), reason="no trainer_image/Dockerfile")
def test_trainer_image_runs_python_as_pid_1_with_its_spool_under_tmp():
    _, stages = parse(TRAINER)
    final = stages[-1]
    assert final_user(final) == "10001:10001"
    entry = final.all("ENTRYPOINT")[-1]
    assert entry.startswith("[") and json.loads(entry)[0] == "python", entry  # exec form, no shell
    assert env_of(final)["PHOENIX_SPOOL_DIR"].startswith("/tmp/")


def test_operator_package_builds_from_exactly_the_copied_sources(tmp_path):
    """Recreate the build stage's context and build the wheel `pip install .[operator]`
    would install: the COPY set is complete, and the operator imports without torch."""
    _, stages = parse(OPERATOR)
    ctx = tmp_path / "ctx"
    for src in copy_sources(next(s for s in stages if s.name == "build")):
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


@pytest.mark.parametrize("dockerfile", [TRAINER, USER_IMAGE], ids=["trainer", "user-image"])
def test_trainer_images_install_the_start_hook(dockerfile):
    """A .pth file runs phoenix_trainer.preflight at interpreter start (a clear error naming
    PHOENIX_SPOOL_DIR instead of torch's 'No usable temporary directory'), then the
    prefetch: both images write it with the package's own command, after installing it."""
    _, stages = parse(dockerfile)
    runs = stages[-1].all("RUN")
    hook = [i for i, arg in enumerate(runs) if re.search(r"(^|&&\s*)phoenix-trainer-hook\b", arg)]
    assert hook, f"{dockerfile.name} must run phoenix-trainer-hook"
    assert any("pip install" in arg for arg in runs[: hook[0] + 1])


# --- examples/user-image/Dockerfile: the runtime added to an image of the user's own -------


def test_user_image_adds_the_runtime_to_any_python_base():
    """FROM a build argument (default: an official python image, no registry host); the
    package comes from pip (the requirement a build argument, so a wheel or a private index
    can stand in), then the hook; a numeric non-root user; python as PID 1 (exec form)."""
    args, stages = parse(USER_IMAGE)
    assert len(stages) == 1 and stages[0].base == args["PYTHON_IMAGE"]
    assert args["PYTHON_IMAGE"].startswith("python:") and "/" not in args["PYTHON_IMAGE"]
    final = stages[0]
    assert any('pip install' in arg and "${PHOENIX_REQUIREMENT}" in arg for arg in final.all("RUN"))
    assert 'PHOENIX_REQUIREMENT="phoenix-jobs[trainer]"' in final.all("ARG")
    user = final_user(final).split(":")[0]
    assert user.isdigit() and int(user) != 0
    entry = json.loads(final.all("ENTRYPOINT")[-1])
    assert entry[0] == "python"
    env = env_of(final)
    assert env["PHOENIX_SPOOL_DIR"].startswith("/tmp/") and env["HOME"] == "/tmp"
    assert env.get("USER") and env.get("LOGNAME")
    assert not re.search(r"^#\s*syntax\s*=", USER_IMAGE.read_text(), re.MULTILINE | re.IGNORECASE)


def test_user_image_copies_from_the_examples_folder():
    # Its documented context is examples/ (docs/integrations.md, the Dockerfile's header).
    _, stages = parse(USER_IMAGE)
    sources = copy_sources(stages[0])
    assert sources
    for src in sources:
        assert (REPO / "examples" / src).is_file(), src


# --- trainer_image/Dockerfile's torch variants (cuda, cpu), published by the release ------


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER, USER_IMAGE],
                         ids=["operator", "trainer", "user-image"])
def test_every_run_is_valid_posix_shell(dockerfile):
    # The daemon runs RUN through /bin/sh (dash on Debian): no bash-only syntax.
    sh = shutil.which("dash") or shutil.which("sh")
    _, stages = parse(dockerfile)
    for run in (r for s in stages for r in s.all("RUN")):
        proc = subprocess.run([sh, "-n", "-c", run], capture_output=True, text=True)
        assert proc.returncode == 0, f"{run[:80]}...: {proc.stderr}"


def torch_install(stage: Stage) -> str:
    (run,) = [run for _, run in install_runs(stage) if "-r /tmp/deps/requirements.txt" in run]
    return run


def test_trainer_torch_variant_is_a_build_argument_the_lab_need_not_pass():
    """Default cuda (what the lab builds, passing only PYTHON_IMAGE); the CPU wheel index and
    the torch pin have no default, so no index host is written into the Dockerfile; the pin
    reaches both installs, and the layer that installs torch checks what it got."""
    _, stages = parse(TRAINER)
    final = stages[-1]
    assert {"TORCH_VARIANT=cuda", 'TORCH_INDEX_URL=""', 'TORCH_VERSION=""'} <= set(final.all("ARG"))
    run = torch_install(final)
    assert run.count('${TORCH_VERSION:+"torch==$TORCH_VERSION"}') == 2, run
    assert '--index-url "$TORCH_INDEX_URL"' in run
    assert "torch.version.cuda" in run and run.index("torch.version.cuda") > run.index("-r /tmp")
    assert 'dev.phoenix.torch-variant="${TORCH_VARIANT}"' in final.all("LABEL")


def test_trainer_variant_check_tells_a_cuda_torch_from_a_cpu_one(monkeypatch):
    """The build's own check, run here with the environment's real torch: a CUDA build
    passes as cuda and fails as cpu; with no CUDA version (a CPU build) the other way round."""
    torch = pytest.importorskip("torch")
    run = torch_install(parse(TRAINER)[1][-1])
    code = re.search(r'python -c "([^"]+)"', run).group(1)

    def check(variant: str, cuda: str | None) -> object:
        monkeypatch.setenv("TORCH_VARIANT", variant)
        monkeypatch.setattr(torch.version, "cuda", cuda)
        with pytest.raises(SystemExit) as exit_:
            exec(compile(code, "trainer_image/Dockerfile", "exec"), {})
        return exit_.value.code

    assert check("cuda", "13.0") is None
    assert check("cpu", None) is None
    failed = check("cpu", "13.0")
    assert isinstance(failed, str) and "TORCH_VARIANT=cpu" in failed and "TORCH_INDEX_URL" in failed
    assert "TORCH_VARIANT=cuda" in check("cuda", None)
