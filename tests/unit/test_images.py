"""lab/phoenix_lab/images.py without a container engine: the Debian mirror read from apt
sources, the content tag (what a Dockerfile copies, nothing else), the pause image's root
filesystem and the condensed build output. The builds themselves run in the lab."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from phoenix_lab import images

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_debian_mirror_from_deb822_sources_skips_security_and_comments(tmp_path):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\n# a comment: with a colon\nURIs: http://mirror.invalid/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    assert images.debian_mirror(tmp_path) == "http://mirror.invalid/debian"


def test_debian_mirror_from_a_one_line_sources_list(tmp_path):
    (tmp_path / "sources.list").write_text(
        "# deb http://old.invalid/debian bookworm main\n"
        "deb-src http://src.invalid/debian bookworm main\n"
        "deb [signed-by=/usr/share/keyrings/k.gpg] http://one.invalid/debian bookworm main\n")
    assert images.debian_mirror(tmp_path) == "http://one.invalid/debian"


def test_no_debian_source_says_what_is_missing(tmp_path):
    with pytest.raises(images.LabError, match="bookworm"):
        images.debian_mirror(tmp_path)


def make_context(root: Path) -> images.ProjectImage:
    (root / "src" / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "pyproject.toml").write_text("[project]\nname='x'\n")
    (root / "src" / "pkg" / "a.py").write_text("A = 1\n")
    (root / "src" / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (root / "docs" / "x.md").write_text("docs\n")
    (root / ".dockerignore").write_text("docs\n**/__pycache__\n")
    dockerfile = root / "Dockerfile"
    dockerfile.write_text("ARG PYTHON_IMAGE=python:3.11-slim\nFROM ${PYTHON_IMAGE} AS build\n"
                          "COPY pyproject.toml ./\nCOPY --chown=1:1 src/pkg/ src/pkg/\n"
                          "FROM ${PYTHON_IMAGE}\nCOPY --from=build /src /src\n")
    return images.ProjectImage("t", "t", dockerfile)


def test_content_tag_follows_exactly_what_the_dockerfile_copies(tmp_path):
    image = make_context(tmp_path)
    assert images.dockerfile_sources(image.dockerfile) == ["pyproject.toml", "src/pkg/"]
    assert images.context_files(image.dockerfile, tmp_path) == ["pyproject.toml", "src/pkg/a.py"]
    tag = images.input_hash(image, "sha256:base1", tmp_path)
    assert len(tag) == 12 and tag == images.input_hash(image, "sha256:base1", tmp_path)
    # not copied, or dockerignored: same tag
    (tmp_path / "docs" / "x.md").write_text("changed\n")
    (tmp_path / "src" / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\1")
    (tmp_path / "README.md").write_text("new\n")
    assert images.input_hash(image, "sha256:base1", tmp_path) == tag
    # a new base, a code edit, a new file, a mode change, a Dockerfile edit: new tags
    seen = {tag, images.input_hash(image, "sha256:base2", tmp_path)}
    (tmp_path / "src" / "pkg" / "a.py").write_text("A = 2\n")
    seen.add(images.input_hash(image, "sha256:base1", tmp_path))
    (tmp_path / "src" / "pkg" / "b.py").write_text("")
    seen.add(images.input_hash(image, "sha256:base1", tmp_path))
    (tmp_path / "src" / "pkg" / "b.py").chmod(0o755)
    seen.add(images.input_hash(image, "sha256:base1", tmp_path))
    image.dockerfile.write_text(image.dockerfile.read_text() + "USER 1\n")
    seen.add(images.input_hash(image, "sha256:base1", tmp_path))
    assert len(seen) == 6


def test_the_repos_trainer_image_hashes_its_runtime_and_examples_only():
    files = images.context_files(REPO / "trainer_image" / "Dockerfile", REPO)
    assert "trainer_image/phoenix_trainer/checkpoint.py" in files
    assert "examples/train_mlp.py" in files and "pyproject.toml" in files
    assert not [f for f in files if f.startswith(("tests/", "operator/", "lab/", "docs/"))
                or "__pycache__" in f]


def test_pause_rootfs_is_busybox_sleep_readable_by_any_uid():
    data = images._pause_rootfs(b"\x7fELF fake busybox")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].mode == 0o755 and members["bin/busybox"].uid == 0
    assert members["bin/sleep"].issym() and members["bin/sleep"].linkname == "busybox"
    assert members["tmp"].mode == 0o1777
    assert images.PAUSE_CHANGES == ('ENTRYPOINT ["/bin/sleep","infinity"]',)


def test_build_output_is_condensed_to_steps():
    seen: list[str] = []
    lines = images._BuildLines(seen.append, "trainer")
    for line in [
        "#1 [internal] load build definition from Dockerfile",
        "#1 DONE 0.0s",
        "#5 [2/9] RUN python -m venv /opt/venv",
        "#5 0.512 creating venv",
        "#5 DONE 3.5s",
        "#6 [3/9] COPY pyproject.toml /tmp/deps/pyproject.toml",
        "#6 CACHED",
        "#7 [4/9] RUN pip install -r /tmp/deps/requirements.txt",
        "#7 sha256:6d938d6217a40bab582608822c41f359de609051fcac7ba49c08c04db8429ff8",
        "#7 12.3 Downloading torch-2.9.0-cp311-cp311-manylinux_2_28_x86_64.whl (899.8 MB)",
        "#7 12.4 Downloading tiny-1.0-py3-none-any.whl (12.0 kB)",
        "#7 80.1 Successfully installed torch-2.9.0",
        "#7 DONE 81.0s",
        "#8 exporting to image",
        "#8 exporting layers",
        "#8 DONE 20.5s",
    ]:
        lines(line)
    text = "\n".join(seen)
    assert "internal" not in text and "creating venv" not in text and "tiny" not in text
    assert "[2/9] RUN python -m venv /opt/venv" in text and "done 3.5s" in text
    assert "[3/9] COPY pyproject.toml /tmp/deps/pyproject.toml (cached)" in text
    assert "torch-2.9.0-cp311" in text and "Successfully installed" in text
    assert "sha256" not in text and "done 81.0s" in text and "exporting to image done 20.5s" in text
    assert len(seen) == 9, seen  # 2/9 start+done, 3/9, 4/9 start+torch+installed+done, export
