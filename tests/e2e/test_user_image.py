"""A trainer image of the user's own: examples/user-image/Dockerfile, its documented lines
(`pip install "phoenix-jobs[trainer]"` + `phoenix-trainer-hook`) on a Python image that has
torch but no Phoenix, runs the sample job on the lab; preempted, the replacement resumes
with the checkpoint prefetched by the hook (the start-up breakdown in its attempt log).

Not in `make test`: it builds two images, `docker save`s the result (several GB: torch) and
imports it into a node, minutes on this machine. `make test-user-image` runs it
(PHOENIX_USER_IMAGE_E2E=1). Lab only: it builds with the lab's dockerd.

Where the pieces come from, since the lab reaches no registry and no index has a release:
- the package: a wheel built from this checkout, served to the build on loopback
  (`PIP_FIND_LINKS`, `PIP_NO_INDEX`: build arguments the Dockerfile declares for that);
- the "user's image with torch": the lab's trainer image with the Phoenix package and its
  hook uninstalled (torch, numpy and boto3 stay). A plain Python base that downloads torch
  itself works the same (the Dockerfile's default base); it is not used here because its
  new multi-GB layers would be saved and imported into a node on every run, where these
  layers are already on the node and only the small new ones are unpacked.
"""
from __future__ import annotations

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
# The user's own image: Python and torch, no Phoenix (see the module docstring).
BASE_DOCKERFILE = """\
FROM {trainer}
USER root
RUN pip uninstall -y phoenix-jobs \\
 && rm -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/phoenix-preflight.pth" \\
 && python -c "import torch, numpy, boto3" \\
 && ! python -c "import phoenix_trainer" 2>/dev/null \
 && rm -rf /tmp/phoenix-spool
ENTRYPOINT []
CMD ["python"]
"""


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
    empty = tmp / "base-context"
    empty.mkdir()
    base = "phoenix-user-base:" + hashlib.sha256(lab.trainer_image.encode()).hexdigest()[:12]
    images.docker("build", "--network", "host", "-t", base, "-f", "-", str(empty),
                  input=BASE_DOCKERFILE.format(trainer=lab.trainer_image).encode(), timeout=600)
    tag = hashlib.sha256((_source_hash() + images.image_id(base)).encode()).hexdigest()[:12]
    ref = f"phoenix-user-trainer:{tag}"
    if images.image_id(ref, missing_ok=True) is None:
        _build(images, tmp, base, ref)
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


def _build(images, tmp: Path, base: str, ref: str) -> None:
    """examples/user-image/Dockerfile on ``base``, the package from this checkout's wheel."""
    wheel = _wheel(tmp)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(wheel.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        images.docker(
            "build", "--no-cache", "--network", "host", "-f", str(USER_DOCKERFILE),
            "--build-arg", f"PYTHON_IMAGE={base}",
            "--build-arg", f"PIP_FIND_LINKS=http://127.0.0.1:{server.server_port}/",
            "--build-arg", "PIP_NO_INDEX=1",  # torch & co. are in the base; ours is served above
            "-t", ref, str(REPO / "examples"), timeout=600)
    finally:
        server.shutdown()


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
