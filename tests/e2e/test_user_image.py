"""A trainer image of the user's own: examples/user-image/Dockerfile, its documented lines
(`pip install "phoenix-jobs[trainer]"` + `phoenix-trainer-hook`) on a plain Python image (no
torch, nothing of ours), runs the sample job on the lab; preempted, the replacement resumes
with the checkpoint prefetched by the hook (the start-up breakdown in its attempt log).

Not in `make test`: the image is several GB (pip installs torch and its CUDA wheels into it),
and it is `docker save`d and imported into a node, minutes on this machine. `make
test-user-image` runs it (PHOENIX_USER_IMAGE_E2E=1). Lab only: it builds with the lab's dockerd.

Where the pieces come from, since the lab reaches no image registry and no index has a release:
- the plain Python image: the lab's Debian base (``images.BASE_IMAGE``, debootstrap) with a
  virtualenv first on PATH, which is what the official ``python`` images give a Dockerfile:
  ``python`` and a ``pip`` that installs into it. Nothing else is added.
- the package: a wheel built from this checkout. Its requirements (torch and its CUDA
  wheels, numpy, boto3) come from the package index, downloaded once by pip inside the plain
  image into a wheelhouse under the lab's cache; the build then installs from that
  wheelhouse and the checkout's wheel, served on loopback (``PIP_FIND_LINKS``,
  ``PIP_NO_INDEX``: build arguments the Dockerfile declares for that), so a rebuild does not
  download GBs again. The Dockerfile's lines are the documented ones either way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from phoenix_operator.podspec import pod_name
from phoenix_e2e import evict_first_attempt_and_finish, resume_startup, sample_job, unique

pytestmark = [
    pytest.mark.e2e, pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PHOENIX_USER_IMAGE_E2E", "") not in ("1", "true"),
                       reason="builds and imports a second trainer image (minutes): "
                              "`make test-user-image` (PHOENIX_USER_IMAGE_E2E=1)"),
]

REPO = Path(__file__).resolve().parents[2]
USER_DOCKERFILE = REPO / "examples" / "user-image" / "Dockerfile"
NODE = "lab-spot-1"  # both attempts run here: the image is imported into this node only
# A plain Python image (see the module docstring): `python` and its `pip`, nothing else.
PLAIN_PYTHON_DOCKERFILE = """\
FROM {base}
RUN python3 -m venv /opt/python && /opt/python/bin/python -m pip --version \\
 && ! /opt/python/bin/python -c "import torch" 2>/dev/null
ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["python"]
"""
REQUIREMENT = "phoenix-jobs[trainer]"


def _source_hash() -> str:
    """What the wheel is made of: the image is rebuilt exactly when this changes (the
    Dockerfile's pip step fetches the wheel over the network, which docker's layer cache
    cannot see, so the build runs with --no-cache when it runs)."""
    h = hashlib.sha256()
    files = [REPO / "pyproject.toml", USER_DOCKERFILE, REPO / "examples" / "train_mlp.py"]
    for pkg in (REPO / "operator" / "phoenix_operator", REPO / "trainer_image" / "phoenix_trainer"):
        files += sorted(p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for f in files:
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _wheel(tmp: Path) -> Path:
    """The phoenix-jobs wheel of this checkout (as `pip wheel .` builds it)."""
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".lab", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache"))
    out = tmp / "wheels"
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                            "print(b.build_wheel(sys.argv[1]))", str(out)],
                           cwd=src, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = out.glob("phoenix_jobs-*.whl")
    return wheel


@pytest.fixture(scope="module")
def user_image(e2e, tmp_path_factory):
    """The user image's reference, present in NODE's containerd."""
    lab = e2e.extra.get("lab") if e2e.extra else None
    if lab is None:
        pytest.skip("needs the lab (it builds with the lab's dockerd and imports into a node)")
    from phoenix_lab import images, nodes

    tmp = tmp_path_factory.mktemp("user-image")
    plain = _plain_python_image(images, tmp)
    tag = hashlib.sha256((_source_hash() + images.image_id(plain)).encode()).hexdigest()[:12]
    ref = f"phoenix-user-trainer:{tag}"
    if images.image_id(ref, missing_ok=True) is None:
        _build(images, tmp, plain, ref)
    # The hook is in place (a pod's /tmp is an emptyDir: a tmpfs here).
    check = images.docker("run", "--rm", "--network", "none", "--tmpfs", "/tmp", "--entrypoint",
                          "phoenix-trainer-hook", ref, "--check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    tar = images.save_image(ref)
    try:
        nodes.ctr(lab.node(NODE).socket, "images", "import", "--snapshotter", "overlayfs", str(tar))
    finally:
        tar.unlink(missing_ok=True)  # several GB; the image itself stays in dockerd's cache
        tar.with_name(tar.name + ".id").unlink(missing_ok=True)
    return ref


def _plain_python_image(images, tmp: Path) -> str:
    """The plain Python image (module docstring), built on the lab's Debian base."""
    base = images.ensure_base_image()
    ref = "phoenix-plain-python:" + images.image_id(base).split(":")[-1][:12]
    if images.image_id(ref, missing_ok=True) is None:
        context = tmp / "plain-context"
        context.mkdir()
        images.docker("build", "--network", "host", "-t", ref, "-f", "-", str(context),
                      input=PLAIN_PYTHON_DOCKERFILE.format(base=base).encode(), timeout=600)
    return ref


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # pip's dozens of GETs are not worth a line each
        pass


@contextlib.contextmanager
def _served(folder: Path) -> Iterator[str]:
    """``folder`` over HTTP on loopback, as a pip find-links URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def _wheelhouse(images, plain: str, wheel: Path) -> Path:
    """Every wheel ``REQUIREMENT`` needs, in the lab's cache: pip inside the plain image
    downloads what is missing from the package index (so the platform tags are the image's;
    files already there are reused), this checkout's wheel among them (an older one is
    removed first: pip would reuse a file of the same name instead)."""
    from phoenix_lab import paths

    house = paths.cache_dir() / "user-image-wheelhouse"
    house.mkdir(parents=True, exist_ok=True)
    for old in house.glob("phoenix_jobs-*.whl"):
        old.unlink()
    with _served(wheel.parent) as ours:
        images.docker("run", "--rm", "--network", "host", "--user", "0", "-v", f"{house}:/wheels",
                      plain, "pip", "download", "--progress-bar", "off", "--dest", "/wheels",
                      "--find-links", ours, REQUIREMENT, timeout=1800)
    assert (house / wheel.name).is_file(), sorted(p.name for p in house.iterdir())
    return house


def _build(images, tmp: Path, plain: str, ref: str) -> None:
    """examples/user-image/Dockerfile on the plain image, installing from the wheelhouse."""
    house = _wheelhouse(images, plain, _wheel(tmp))
    with _served(house) as url:
        images.docker(
            "build", "--no-cache", "--network", "host", "-f", str(USER_DOCKERFILE),
            "--build-arg", f"PYTHON_IMAGE={plain}",
            "--build-arg", f"PIP_FIND_LINKS={url}",
            "--build-arg", "PIP_NO_INDEX=1",  # everything is in the wheelhouse
            "-t", ref, str(REPO / "examples"), timeout=1800)


def test_user_image_runs_the_sample_job_with_prefetch(e2e, kube, e2e_bucket, submit_job, user_image):
    target = dataclasses.replace(e2e, trainer_image=user_image, trainer_command=["python", "/app/train.py"])
    body = sample_job(target, unique("user-image"), e2e_bucket)
    spec = body["spec"]["template"]["spec"]
    spec["nodeSelector"] = {"kubernetes.io/hostname": NODE}
    spec["tolerations"] = [{"key": "phoenix.dev/spot", "operator": "Exists", "effect": "NoSchedule"}]
    name = submit_job(body)
    evict_first_attempt_and_finish(e2e, kube, e2e_bucket, name)
    second = kube.core.read_namespaced_pod(pod_name(name, "train", 2), e2e.namespace)
    assert second.spec.containers[0].image == user_image
    # The replacement's start-up: the hook's prefetch downloaded the checkpoint while the
    # script imported torch.
    resume_startup(e2e, e2e_bucket, name)
