"""What a release publishes, and the check that a tag may be published at all.

The release workflow (``.github/workflows/release.yaml``) asks this module three things:

* ``check --tag vX.Y.Z``: the tag, the Python distribution's version (``pyproject.toml``, the
  one source of truth), the chart's ``version`` and ``appVersion``, the chart's default
  operator image tag and the version uv.lock was made for all say the same; a release
  publishes nothing unless they do.
* ``tags``: the image tags, from the project version and uv.lock. The operator gets
  ``<version>``. The trainer comes in two variants: CUDA (torch from the default index, with
  the NVIDIA wheels it depends on) tagged ``<version>`` and
  ``<version>-torch<torch>-cuda<major.minor>``, and CPU (torch from a CPU-only wheel index)
  tagged ``<version>-cpu`` and ``<version>-torch<torch>-cpu``. The CUDA version is the one
  of the CUDA runtime wheel in torch's locked dependencies, so a user can match it to the
  node's driver.
* ``chart-image --repository R``: point the packaged chart's default operator image at the
  registry the workflow pushed to (only the ``image.repository`` line changes).

Never names a registry host: the registry comes from the workflow (a repository variable).
uv.lock is made where it is used (``lab/bootstrap.sh``, the workflows' ``uv lock``) and never
committed: a lock names the package index's host.
Stdlib and PyYAML only, so the workflow runs it straight from the checkout
(``PYTHONPATH=lab python -m phoenix_lab.release``).
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml


def _checkout() -> Path:
    """This checkout when run from it (PYTHONPATH=lab, or the editable install), else the
    current directory (``pip install ./lab`` copies the module away from the checkout)."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "charts" / "phoenix" / "Chart.yaml").is_file() else Path.cwd()


REPO = _checkout()
DISTRIBUTION = "phoenix-jobs"
CHART = Path("charts/phoenix")
IMAGES = {"operator": "phoenix-operator", "trainer": "phoenix-trainer"}
# The CUDA runtime's wheel: `nvidia-cuda-runtime` (CUDA 13 on) or `nvidia-cuda-runtime-cu12`.
_CUDA_RUNTIME = re.compile(r"nvidia-cuda-runtime(-cu\d+)?")
# Docker's rule for a tag.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class ReleaseError(Exception):
    """The repository is not in a state that can be released; the message says what to fix."""


@dataclass(frozen=True)
class Locked:
    """What uv.lock pins for the trainer image's tags."""

    torch: str
    cuda: str  # major.minor of the CUDA runtime wheel torch depends on


def project_version(repo: Path = REPO) -> str:
    """The distribution's version: the one every other version must equal."""
    return tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]


def locked(lock_text: str) -> Locked:
    """torch's version and its CUDA runtime's major.minor, from uv.lock's text.

    The CUDA runtime is searched in torch's own dependency closure (extras included:
    recent torch reaches it through ``cuda-toolkit[cudart]``), so a wheel some other
    package pulls in cannot decide the tag.
    """
    packages: dict[str, list[dict]] = {}
    for p in tomllib.loads(lock_text).get("package", []):
        packages.setdefault(p["name"], []).append(p)
    torches = packages.get("torch", [])
    if len(torches) != 1:
        raise ReleaseError(f"uv.lock pins {len(torches)} versions of torch, expected 1: "
                           "run `uv lock` and look at the trainer extra")
    torch = torches[0]
    seen: set[str] = set()
    todo = [(torch["name"], ())]
    cuda: set[str] = set()
    while todo:
        name, extras = todo.pop()
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for p in packages.get(name, []):
            if _CUDA_RUNTIME.fullmatch(name):
                cuda.add(p["version"])
            deps = list(p.get("dependencies", []))
            for extra in extras:
                deps += p.get("optional-dependencies", {}).get(extra, [])
            todo += [(d["name"], tuple(d.get("extra", ()))) for d in deps]
    if len(cuda) != 1:
        raise ReleaseError(f"torch {torch['version']} in uv.lock depends on "
                           f"{len(cuda)} CUDA runtime wheels ({', '.join(sorted(cuda)) or 'none'})"
                           ", expected 1: is this a CPU-only lock?")
    major_minor = ".".join(cuda.pop().split(".")[:2])
    return Locked(torch=torch["version"], cuda=major_minor)


def image_tags(version: str, lock: Locked) -> dict[str, list[str]]:
    """Tags per published image: ``operator``, ``trainer-cuda``, ``trainer-cpu``."""
    tags = {
        "operator": [version],
        "trainer-cuda": [version, f"{version}-torch{lock.torch}-cuda{lock.cuda}"],
        "trainer-cpu": [f"{version}-cpu", f"{version}-torch{lock.torch}-cpu"],
    }
    bad = [t for ts in tags.values() for t in ts if not _TAG.fullmatch(t)]
    if bad:
        raise ReleaseError(f"not valid image tags: {bad}")
    return tags


def image_refs(prefix: str, tags: dict[str, list[str]]) -> dict[str, list[str]]:
    """``prefix/<image name>:<tag>`` for each tag; ``prefix`` is ``<registry>/<owner>``."""
    prefix = prefix.rstrip("/")
    return {what: [f"{prefix}/{IMAGES[what.split('-')[0]]}:{t}" for t in ts]
            for what, ts in tags.items()}


def version_problems(tag: str | None, repo: Path = REPO) -> list[str]:
    """Every place whose version disagrees with pyproject.toml's (and with ``tag``)."""
    version = project_version(repo)
    problems = []
    if tag is not None and tag != f"v{version}":
        problems.append(f"tag {tag} is not v{version}, the version in pyproject.toml")
    chart = yaml.safe_load((repo / CHART / "Chart.yaml").read_text())
    for key in ("version", "appVersion"):
        if str(chart.get(key)) != version:
            problems.append(f"{CHART}/Chart.yaml {key} is {chart.get(key)!r}, not {version!r}")
    values = yaml.safe_load((repo / CHART / "values.yaml").read_text())
    default_tag = str(values.get("image", {}).get("tag") or chart.get("appVersion"))
    if default_tag != version:
        problems.append(f"the chart's default operator image tag {default_tag!r} is not one the "
                        "release publishes: leave image.tag empty (it defaults to appVersion)")
    lock_path = repo / "uv.lock"
    if not lock_path.is_file():
        problems.append("uv.lock is missing: run `uv lock` (it is made where it is used, never committed:"
                        " a lock names the package index's host)")
    else:
        ours = [p for p in tomllib.loads(lock_path.read_text()).get("package", [])
                if p["name"] == DISTRIBUTION]
        if [p.get("version") for p in ours] != [version]:
            problems.append(f"uv.lock was made for {DISTRIBUTION} "
                            f"{[p.get('version') for p in ours]}, not {version}: run `uv lock`")
    return problems


def set_chart_image(values_text: str, repository: str) -> str:
    """values.yaml with ``image.repository`` replaced, comments and everything else kept."""
    new, n = re.subn(r"(?m)^(image:\n(?:[ \t]*#.*\n)*[ \t]+repository:[ \t]*)\S+[ \t]*$",
                     lambda m: m.group(1) + repository, values_text, count=1)
    if n != 1:
        raise ReleaseError("values.yaml has no `image:` block starting with `repository:`")
    if yaml.safe_load(new)["image"]["repository"] != repository:
        raise ReleaseError(f"{repository!r} does not survive YAML as the image repository")
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phoenix_lab.release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="the checkout (default: the one this module is in, else the current directory)")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="every version agrees (and with --tag)")
    check.add_argument("--tag", help="the git tag being released, e.g. v0.1.0")
    tags = sub.add_parser("tags", help="print key=value lines (a GitHub step's output)")
    tags.add_argument("--prefix", help="<registry>/<owner>: print full image references")
    chart = sub.add_parser("chart-image", help="set the chart's default operator repository")
    chart.add_argument("--repository", required=True)
    args = parser.parse_args(argv)
    if not (args.repo / CHART / "Chart.yaml").is_file():
        print(f"release: {args.repo} is not a Phoenix checkout (no {CHART}/Chart.yaml): "
              "run from the repository root or pass --repo", file=sys.stderr)
        return 2
    try:
        if args.command == "check":
            problems = version_problems(args.tag, args.repo)
            for p in problems:
                print(f"release check: {p}", file=sys.stderr)
            if not problems:
                print(f"release check: {args.tag or 'v' + project_version(args.repo)} is consistent")
            return 1 if problems else 0
        if args.command == "tags":
            version = project_version(args.repo)
            lock = locked((args.repo / "uv.lock").read_text())
            out = image_tags(version, lock)
            if args.prefix:
                out = image_refs(args.prefix, out)
            print(f"version={version}\ntorch={lock.torch}\ncuda={lock.cuda}")
            for what, values in out.items():
                print(f"{what}={','.join(values)}")
            return 0
        values = args.repo / CHART / "values.yaml"
        values.write_text(set_chart_image(values.read_text(), args.repository))
        return 0
    except ReleaseError as e:
        print(f"release: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
