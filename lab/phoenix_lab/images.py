"""The lab's container images, built on this machine without any container registry.

The lab's nodes run the repository's own images in real kubelets (``nodes.py``). Nothing can
be pulled here, so every image starts from Debian packages:

* ``phoenix-python-base:bookworm``: a ``debootstrap --variant=minbase`` Debian with Python,
  the host's CA bundle (TLS to PyPI goes through an inspecting proxy) and ``PIP_CERT`` /
  ``SSL_CERT_FILE`` set; the Dockerfiles' ``PYTHON_IMAGE`` build argument.
* ``phoenix-pause:1``: the pod sandbox image, a static busybox whose entrypoint sleeps.
* ``phoenix-operator:<tag>`` and ``phoenix-trainer:<tag>``: the repository's two Dockerfiles
  on that base. ``<tag>`` is a short hash of what the Dockerfile copies (plus the Dockerfile
  and the base image's ID), so an unchanged tree reuses the image and any change gets a new
  tag; ``:dev`` follows the newest build.

A lab-owned ``dockerd`` builds them: its own data root, exec root, socket and pidfile under
the cache, and no bridge, iptables or IP forwarding, so it never touches the host's
networking (builds use ``--network host``). ``save_image`` writes ``docker save`` tars that
``nodes.py`` imports into containerd.

Entry point: ``python -m phoenix_lab.images`` (see ``main``). No torch import here, and no
registry or mirror host names: the Debian mirror comes from this host's apt sources.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Iterator

from . import paths
from .procs import LabError, pid_alive

Progress = Callable[[str], None]

BASE_IMAGE = "phoenix-python-base:bookworm"
PAUSE_IMAGE = "phoenix-pause:1"
RECIPE_LABEL = "dev.phoenix.recipe"

DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# The base image's environment, applied by `docker import --change`.
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    f"ENV SSL_CERT_FILE={IMAGE_CA_BUNDLE}",
    f"ENV PIP_CERT={IMAGE_CA_BUNDLE}",
    'CMD ["python3"]',
)
# busybox's sleep takes "infinity" (checked by running it when the image is made).
PAUSE_CHANGES = ('ENTRYPOINT ["/bin/sleep","infinity"]',)


@dataclass(frozen=True)
class ProjectImage:
    """One of the repository's Dockerfiles and the image name it is built as."""

    kind: str
    name: str
    dockerfile: Path


PROJECT_IMAGES = (
    ProjectImage("operator", "phoenix-operator", paths.REPO_ROOT / "Dockerfile"),
    ProjectImage("trainer", "phoenix-trainer", paths.REPO_ROOT / "trainer_image" / "Dockerfile"),
)


@dataclass(frozen=True)
class BuiltImage:
    """A project image as built: ``ref`` (name:tag) is what pods name, ``id`` what changed."""

    kind: str
    name: str
    tag: str
    ref: str
    id: str
    size: int
    built: bool  # False: the tagged image already existed
    seconds: float


def say(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


# ---- the lab's dockerd ---------------------------------------------------------------------
def docker_dir() -> Path:
    return paths.cache_dir() / "docker"


def docker_socket() -> Path:
    return docker_dir() / "docker.sock"


def docker_host() -> str:
    return f"unix://{docker_socket()}"


def docker_cli() -> tuple[str, bool]:
    """(the docker client to use, whether it can build with BuildKit).

    Debian's client (docker.io 20.10, the same release as its dockerd) drives the daemon's
    built-in BuildKit itself when DOCKER_BUILDKIT=1. Clients from 23 on hand BuildKit builds
    to the buildx plugin, which is not installed here ("BuildKit is enabled but the buildx
    component is missing or broken"), which leaves them the legacy builder only. BuildKit
    skips stages the target does not need and caches more precisely, so Debian's client wins.
    """
    debian = Path("/usr/bin/docker")
    if debian.is_file():
        return str(debian), True
    other = shutil.which("docker")
    if other is None:
        raise LabError("no docker client found; install Debian's docker.io (apt-get install docker.io)")
    buildx = subprocess.run([other, "buildx", "version"], capture_output=True, text=True)
    return other, buildx.returncode == 0


def _docker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DOCKER_CONTEXT", None)
    env["DOCKER_HOST"] = docker_host()
    # Our own client config: a host ~/.docker/config.json (contexts, credential helpers)
    # has no say over the lab's daemon.
    env["DOCKER_CONFIG"] = str(docker_dir() / "client")
    env["DOCKER_BUILDKIT"] = "1" if docker_cli()[1] else "0"
    return env


def docker(*args: str, check: bool = True, input: bytes | None = None,
           timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run the docker client against the lab's dockerd; text output captured."""
    proc = subprocess.run([docker_cli()[0], *args], env=_docker_env(), capture_output=True,
                          input=input, timeout=timeout)
    out = subprocess.CompletedProcess(proc.args, proc.returncode,
                                      proc.stdout.decode(errors="replace"),
                                      proc.stderr.decode(errors="replace"))
    if check and proc.returncode != 0:
        raise LabError(f"docker {' '.join(args[:3])} failed ({proc.returncode}): "
                       f"{out.stderr.strip()[-2000:]}")
    return out


def _ping(timeout: float = 2.0) -> bool:
    """Whether the daemon behind the lab's socket answers /_ping."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(docker_socket()))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]


def _dockerd_pid() -> int | None:
    try:
        pid = int((docker_dir() / "dockerd.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if pid_alive(pid) and b"dockerd" in cmdline else None


def _dockerd_argv(driver: str) -> list[str]:
    d = docker_dir()
    return [
        "dockerd",
        "--config-file", str(d / "daemon.json"),
        "--host", docker_host(),
        "--data-root", str(d / "data"),
        "--exec-root", str(d / "exec"),
        "--pidfile", str(d / "dockerd.pid"),
        "--storage-driver", driver,
        # Never touch the host's networking: no docker0 bridge, no iptables rules (dockerd
        # would set the FORWARD policy to DROP and break the lab's bridges), no sysctls.
        # Builds run with --network host; test containers with --network none.
        "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
        "--ip-masq=false",
    ]


def ensure_docker(progress: Progress = say) -> str:
    """Start the lab's own dockerd unless it already runs; return its ``unix://`` socket.

    overlay2 first (vfs copies every layer: gigabytes per step of the trainer image); vfs
    only if overlay2 does not start. The daemon outlives this process (its own session) and
    logs to ``<cache>/docker/dockerd.log``; ``stop_docker`` ends it.

    With no ``--containerd``, dockerd 20.10 starts its own containerd under the exec root,
    unless one answers at /run/containerd/containerd.sock (then it uses that, in the "moby"
    namespace); the lab's node containerds listen elsewhere, so they are never picked.
    """
    d = docker_dir()
    sock = docker_socket()
    if len(str(sock)) > 100:  # sun_path holds 108 bytes
        raise LabError(f"docker socket path {sock} is too long for a unix socket; "
                       "set PHOENIX_CACHE to a shorter directory")
    with _locked("dockerd"):
        pid = _dockerd_pid()
        if pid is not None:
            if _wait(_ping, 30):
                return docker_host()
            raise LabError(f"dockerd (pid {pid}) runs but does not answer on {sock}; "
                           f"see {d / 'dockerd.log'}, or stop it: kill {pid}")
        if shutil.which("dockerd") is None:
            raise LabError("dockerd not found; install Debian's docker.io (apt-get install docker.io)")
        if os.geteuid() != 0:
            raise LabError("the lab's dockerd needs root (it mounts overlay filesystems)")
        d.mkdir(parents=True, exist_ok=True)
        (d / "client").mkdir(exist_ok=True)
        # Our own daemon.json, so a host /etc/docker/daemon.json is not read; the trust key
        # stays under the cache instead of /etc/docker.
        (d / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(d / "key.json")}))
        (d / "dockerd.pid").unlink(missing_ok=True)
        sock.unlink(missing_ok=True)
        # vfs only on a data root that never held overlay2 layers: falling back later would
        # hide every built image and rebuild them, gigabytes per layer.
        drivers = ("overlay2",) if (d / "data" / "overlay2").is_dir() else ("overlay2", "vfs")
        for attempt, driver in enumerate(drivers + (("overlay2",) if len(drivers) == 1 else ())):
            progress(f"starting dockerd (storage driver {driver}) on {sock}")
            with open(d / "dockerd.log", "ab") as log:
                proc = subprocess.Popen(_dockerd_argv(driver), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, cwd=d)
            if _wait(lambda: _ping() or proc.poll() is not None, 60) and proc.poll() is None:
                return docker_host()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                raise LabError(f"dockerd did not answer on {sock} within 60 s; see {d / 'dockerd.log'}")
            tail = _tail(d / "dockerd.log", 5)
            if attempt == 0:
                # A daemon stopped a moment ago may still hold its containerd: retry once.
                progress(f"dockerd failed with {driver} (exit {proc.returncode}); trying once more:\n{tail}")
                time.sleep(3)
                continue
            raise LabError(f"dockerd exited with code {proc.returncode} at start-up; "
                           f"last lines of {d / 'dockerd.log'}:\n{tail}")
    raise AssertionError("unreachable")


def stop_docker(grace: float = 20.0) -> bool:
    """Stop the lab's dockerd (and the containerd it started); False if none ran or another
    process is building or saving an image right now (it is left running then)."""
    pid = _dockerd_pid()
    if pid is None or _busy():
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    if not _wait(lambda: not pid_alive(pid), grace):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, 9)
    return True


# ---- the Python base image -----------------------------------------------------------------
def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this host's apt uses for the base suite (never a name in code)."""
    candidates: list[tuple[list[str], list[str], list[str]]] = []  # (types, uris, suites)
    for f in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            candidates.append((fields.get("types", "").split(), fields.get("uris", "").split(),
                               fields.get("suites", "").split()))
    for f in [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*.list"))]:
        if f.is_file():
            for line in f.read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3:
                    candidates.append(([words[0]], [words[1]], [words[2]]))
    for types, uris, suites in candidates:
        if "deb" in types and DEBIAN_SUITE in suites and uris:
            return uris[0]
    raise LabError(f"no 'deb' source for Debian {DEBIAN_SUITE} in {sources_dir}/sources.list*; "
                   "debootstrap needs a Debian mirror")


def _base_recipe() -> str:
    ca = hashlib.sha256(HOST_CA_BUNDLE.read_bytes()).hexdigest()
    recipe = {"suite": DEBIAN_SUITE, "variant": "minbase", "packages": BASE_PACKAGES,
              "changes": BASE_CHANGES, "ca": ca, "v": 1}
    return _short_hash(json.dumps(recipe, sort_keys=True).encode())


def ensure_base_image(progress: Progress = say) -> str:
    """``phoenix-python-base:bookworm`` from debootstrap (about a minute); cached by recipe."""
    ensure_docker(progress)
    recipe = _base_recipe()
    with _locked("build"):
        if _label(BASE_IMAGE, RECIPE_LABEL) == recipe:
            return BASE_IMAGE
        if shutil.which("debootstrap") is None:
            raise LabError("debootstrap not found; apt-get install debootstrap")
        if not HOST_CA_BUNDLE.is_file():
            raise LabError(f"{HOST_CA_BUNDLE} missing: the base image needs the host's CA bundle")
        mirror = debian_mirror()
        work = _images_dir() / "base-rootfs"
        _remove_tree(work)
        work.mkdir(parents=True)
        t0 = time.monotonic()
        progress(f"making {BASE_IMAGE}: debootstrap {DEBIAN_SUITE} minbase + "
                 f"{', '.join(BASE_PACKAGES)} (about a minute)")
        try:
            _stream(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                     DEBIAN_SUITE, str(work), mirror],
                    _DebootstrapLines(progress), log=_log_path("base"), what="debootstrap", progress=progress)
            # The image trusts what the host trusts: PyPI is reached through the same
            # TLS-inspecting path. PIP_CERT/SSL_CERT_FILE point at this file.
            shutil.copyfile(HOST_CA_BUNDLE, work / IMAGE_CA_BUNDLE.lstrip("/"))
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (work / junk).glob("*"):
                    if p.is_file():
                        p.unlink()
            progress(f"importing the root filesystem as {BASE_IMAGE}")
            changes = [*BASE_CHANGES, f"LABEL {RECIPE_LABEL}={recipe}"]
            tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(work), "-c", "."],
                                   stdout=subprocess.PIPE)
            imp = subprocess.run(
                [docker_cli()[0], "import", *(a for c in changes for a in ("--change", c)),
                 "-m", "debootstrap minbase", "-", BASE_IMAGE],
                stdin=tar.stdout, env=_docker_env(), capture_output=True, text=True)
            tar.stdout.close()
            if tar.wait() != 0 or imp.returncode != 0:
                raise LabError(f"importing {BASE_IMAGE} failed: {imp.stderr.strip()[-2000:]}")
        finally:
            _remove_tree(work)
        progress(f"{BASE_IMAGE} ready in {time.monotonic() - t0:.0f}s "
                 f"({_human(image_size(BASE_IMAGE))})")
        return BASE_IMAGE


class _DebootstrapLines:
    """debootstrap prints a line per package per step; show its phase lines and counts."""

    _PER_PACKAGE = re.compile(r"I: (?:(Retrieving|Validating) \S+ \S*\d\S*"
                              r"|(Extracting|Unpacking|Configuring) [^ ]+\.\.\.)$")

    def __init__(self, progress: Progress):
        self.progress, self.packages = progress, 0

    def __call__(self, line: str) -> None:
        if self._PER_PACKAGE.match(line.strip()):
            self.packages += 1
        elif line.startswith(("I: ", "W: ", "E: ")):
            done = f" (after {self.packages} package steps)" if self.packages else ""
            self.packages = 0
            self.progress(f"  debootstrap: {line[3:].strip()}{done}")


# ---- the pod sandbox image -----------------------------------------------------------------
def ensure_pause_image(progress: Progress = say) -> str:
    """``phoenix-pause:1``: Debian's static busybox sleeping forever, as any uid."""
    ensure_docker(progress)
    recipe = _short_hash(json.dumps(["busybox-static", PAUSE_CHANGES, 1]).encode())
    with _locked("build"):
        if _label(PAUSE_IMAGE, RECIPE_LABEL) == recipe:
            return PAUSE_IMAGE
        progress(f"making {PAUSE_IMAGE} from Debian's busybox-static")
        with tempfile.TemporaryDirectory(dir=_images_dir()) as tmp:
            busybox = _busybox_static(Path(tmp))
            rootfs = _pause_rootfs(busybox.read_bytes())
        changes = [*PAUSE_CHANGES, f"LABEL {RECIPE_LABEL}={recipe}"]
        docker("import", *(a for c in changes for a in ("--change", c)), "-", PAUSE_IMAGE,
               input=rootfs)
        # Proof before it counts as made: it keeps running as a uid with no passwd entry,
        # read-only, without capabilities.
        name = f"phoenix-pause-check-{os.getpid()}"
        try:
            docker("run", "-d", "--name", name, "--network", "none", "--user", "54321:54321",
                   "--read-only", "--cap-drop", "ALL", PAUSE_IMAGE)
            time.sleep(1.0)
            state = docker("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", name).stdout
            if not state.startswith("true"):
                logs = docker("logs", name, check=False)
                raise LabError(f"{PAUSE_IMAGE} does not keep running ({state.strip()}): "
                               f"{(logs.stdout + logs.stderr).strip()[-500:]}")
        except LabError:
            docker("rmi", "-f", PAUSE_IMAGE, check=False)
            raise
        finally:
            docker("rm", "-f", name, check=False)
        return PAUSE_IMAGE


def _busybox_static(tmp: Path) -> Path:
    """/bin/busybox from Debian's busybox-static package (downloaded, not installed)."""
    def download() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", "-q", "busybox-static"], cwd=tmp,
                              capture_output=True, text=True)

    got = download()
    if got.returncode != 0:  # no package lists yet on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
        got = download()
    debs = list(tmp.glob("busybox-static_*.deb"))
    if got.returncode != 0 or not debs:
        raise LabError(f"apt-get download busybox-static failed: {got.stderr.strip()[-1000:]}")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")], check=True)
    return tmp / "x" / "bin" / "busybox"


def _pause_rootfs(busybox: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, mode: int, kind: bytes = tarfile.DIRTYPE, data: bytes = b"",
                link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, 0, 0, 0
            info.linkname, info.size = link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        for d in ("bin", "dev", "etc", "proc", "sys"):
            add(d, 0o755)
        add("tmp", 0o1777)
        add("bin/busybox", 0o755, tarfile.REGTYPE, busybox)
        for applet in ("sleep", "sh"):
            add(f"bin/{applet}", 0o777, tarfile.SYMTYPE, link="busybox")
    return buf.getvalue()


# ---- the project's images ------------------------------------------------------------------
def dockerfile_sources(dockerfile: Path) -> list[str]:
    """Build-context paths the Dockerfile COPY/ADDs (not ``--from`` another stage)."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    sources: list[str] = []
    for line in text.splitlines():
        op, _, rest = line.strip().partition(" ")
        if op.upper() not in ("COPY", "ADD") or "--from=" in rest:
            continue
        words = json.loads(rest) if rest.strip().startswith("[") else \
            [w for w in rest.split() if not w.startswith("--")]
        sources += words[:-1]
    return sources


def _dockerignore(repo: Path) -> list[str]:
    f = repo / ".dockerignore"
    if not f.is_file():
        return []
    return [p.strip().rstrip("/") for p in f.read_text().splitlines()
            if p.strip() and not p.lstrip().startswith(("#", "!"))]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Roughly .dockerignore's matching: a pattern excludes a path or any of its parents."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pat in patterns:
            if fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch(parts[i - 1], pat[3:])):
                return True
    return False


def context_files(dockerfile: Path, repo: Path = paths.REPO_ROOT) -> list[str]:
    """The repo-relative files a build of ``dockerfile`` copies: tracked or untracked but
    not git-ignored, under its COPY sources, minus what .dockerignore excludes."""
    sources = [s.rstrip("/") or "." for s in dockerfile_sources(dockerfile)]
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-c", "-o",
                             "--exclude-standard", "--", *sources],
                            capture_output=True, text=True)
    if listed.returncode == 0:
        files = set(filter(None, listed.stdout.split("\0")))
    else:  # not a git checkout: everything under the sources
        files = set()
        for src in sources:
            p = repo / src
            found = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]
            files.update(str(q.relative_to(repo)) for q in found)
    patterns = _dockerignore(repo)
    return sorted(f for f in files if (repo / f).is_file() and not _ignored(f, patterns))


def input_hash(image: ProjectImage, base_id: str, repo: Path = paths.REPO_ROOT) -> str:
    """The image's tag: Dockerfile, base image ID, and every copied file's path, mode, bytes."""
    h = hashlib.sha256()
    h.update(image.dockerfile.read_bytes())
    h.update(base_id.encode())
    for rel in context_files(image.dockerfile, repo):
        p = repo / rel
        h.update(f"\0{rel}\0{p.stat().st_mode & 0o111:o}\0".encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def ensure_project_images(progress: Progress = say) -> dict[str, BuiltImage]:
    """Build the operator and trainer images unless their content tag already exists.

    Returns ``{"operator": BuiltImage, "trainer": BuiltImage}``; both are also tagged
    ``:dev``. A cold trainer build downloads torch with its CUDA libraries (several GB).
    """
    base = ensure_base_image(progress)
    base_id = image_id(base)
    out: dict[str, BuiltImage] = {}
    with _locked("build"):
        record = _record()
        for image in PROJECT_IMAGES:
            previous = record.get(image.kind, {}).get("tag", "")
            out[image.kind] = _ensure_project_image(image, base, base_id, previous, progress)
        record.update({k: asdict(v) for k, v in out.items()})
        _record_path().write_text(json.dumps(record, indent=2))
    return out


def _ensure_project_image(image: ProjectImage, base: str, base_id: str, previous: str,
                          progress: Progress) -> BuiltImage:
    tag = input_hash(image, base_id)
    ref = f"{image.name}:{tag}"
    t0 = time.monotonic()
    built = image_id(ref, missing_ok=True) is None
    if built:
        progress(f"building {ref} from {image.dockerfile.relative_to(paths.REPO_ROOT)}")
        cli, buildkit = docker_cli()
        args = [cli, "build", "--network", "host", "--file", str(image.dockerfile),
                "--build-arg", f"PYTHON_IMAGE={base}", "--tag", ref,
                "--label", f"{RECIPE_LABEL}={tag}"]
        if buildkit:
            args += ["--progress", "plain"]
        _stream([*args, str(paths.REPO_ROOT)], _BuildLines(progress, image.kind),
                log=_log_path(image.kind), what=f"docker build of {ref}", progress=progress, env=_docker_env())
    docker("tag", ref, f"{image.name}:dev")
    if built:
        # The previous build stays: another process (a lab started before this edit) may
        # still be saving or stamping it.
        _drop_old_tags(image.name, keep={tag, "dev", previous})
    seconds = time.monotonic() - t0
    result = BuiltImage(image.kind, image.name, tag, ref, image_id(ref), image_size(ref), built,
                        round(seconds, 1))
    progress(f"{ref}: {'built in %.0fs' % seconds if built else 'up to date'} "
             f"({_human(result.size)}, {result.id[:19]})")
    return result


class _BuildLines:
    """Condense `docker build` output to a line per step, plus pip's big downloads.

    BuildKit's plain output tags every line with its step (``#7 [build 3/6] RUN ...``,
    ``#7 0.51 <output>``, ``#7 DONE 3.5s`` or ``#7 CACHED``): a step is shown when it starts
    producing output or ends, once, with its time or "cached".
    """

    def __init__(self, progress: Progress, kind: str):
        self.progress, self.kind = progress, kind
        self.steps: dict[str, str | None] = {}  # step number -> name (None: not shown)
        self.shown: set[str] = set()

    def _say(self, msg: str) -> None:
        self.progress(f"  {self.kind}: {msg}")

    def __call__(self, line: str) -> None:
        m = re.match(r"#(\d+) (.*)$", line)
        if m is None:
            if line.startswith("Step ") or " ---> Using cache" in line:  # the legacy builder
                self._say(_clip(line.strip()))
            else:
                self._pip(line)
            return
        n, rest = m.groups()
        if n not in self.steps:
            wanted = rest.startswith("[") and not rest.startswith("[internal]")
            self.steps[n] = rest if wanted or rest == "exporting to image" else None
            return
        name = self.steps[n]
        if name is None:
            return
        done = re.match(r"DONE ([\d.]+)s$", rest)
        if rest == "CACHED" or done or rest.startswith("ERROR"):
            if n not in self.shown:
                self.shown.add(n)
                if rest == "CACHED":
                    end = " (cached)"
                elif done:
                    end = f" ({float(done.group(1)):.1f}s)" if float(done.group(1)) >= 1.0 else ""
                else:
                    end = f" ({rest.lower()})"
                self._say(f"{_clip(name, 90)}{end}")
            elif not done or float(done.group(1)) >= 1.0:
                self._say(f"{_clip(name, 40)} {rest.lower()}")
            return
        if rest.startswith("sha256:"):  # the step's cache key, not output
            return
        if n not in self.shown:
            self.shown.add(n)
            self._say(_clip(name))
        self._pip(rest)

    def _pip(self, line: str) -> None:
        m = re.search(r"(Downloading \S+ \(([\d.]+) ([kMG]B)\)|Successfully installed .*|ERROR: .*)", line)
        if m and (not m.group(2) or m.group(3) == "GB" or (m.group(3) == "MB" and float(m.group(2)) >= 20)):
            self._say(_clip(m.group(1)))


def _drop_old_tags(name: str, keep: set[str]) -> None:
    """Untag other content tags of ``name``: every code edit makes a new one, and an edit
    of pyproject.toml a new multi-GB dependency layer that old tags would keep alive."""
    listed = docker("image", "ls", "--format", "{{.Tag}}", name, check=False).stdout.split()
    for tag in listed:
        if tag not in keep and tag != "<none>":
            docker("rmi", f"{name}:{tag}", check=False)


# ---- everything together, and what nodes import --------------------------------------------
def ensure_all(progress: Progress = say) -> dict[str, str]:
    """Docker, base, pause, operator and trainer images: ``{kind: ref}`` for the lab's nodes
    (kinds "operator", "trainer", "pause")."""
    ensure_docker(progress)
    ensure_pause_image(progress)
    built = ensure_project_images(progress)
    return {**{k: v.ref for k, v in built.items()}, "pause": PAUSE_IMAGE}


def built_images() -> dict[str, str]:
    """``{kind: ref}`` of the images the last ``ensure_all``/``ensure_project_images``
    made, without building or starting anything (e.g. what a running lab's nodes hold)."""
    record = _record()
    if not all(i.kind in record for i in PROJECT_IMAGES):
        raise LabError("the lab's images have not been built yet; run "
                       "'python -m phoenix_lab.images' (or 'phoenix-lab up')")
    return {**{k: v["ref"] for k, v in record.items()}, "pause": PAUSE_IMAGE}


def stamp(images: dict[str, str]) -> str:
    """A hash of the images' IDs: it changes exactly when some image's content does."""
    lines = sorted(f"{ref}={image_id(ref)}" for ref in images.values())
    return _short_hash("\n".join(lines).encode())


def save_image(ref: str, progress: Progress = say) -> Path:
    """``docker save`` of ``ref`` to a tar under the cache, reused while its image ID holds.

    Earlier tars of the same image name are deleted (the trainer's is several GB)."""
    ensure_docker(progress)
    current = image_id(ref)
    tars = _images_dir() / "tars"
    tars.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", ref)
    tar, idfile = tars / f"{safe}.tar", tars / f"{safe}.tar.id"
    with _locked(f"save-{safe}"):
        if tar.is_file() and idfile.is_file() and idfile.read_text() == current:
            return tar
        t0 = time.monotonic()
        progress(f"saving {ref} to {tar}")
        part = tar.with_suffix(".part")
        docker("save", "--output", str(part), ref)
        part.replace(tar)
        idfile.write_text(current)
        progress(f"saved {ref} ({_human(tar.stat().st_size)}) in {time.monotonic() - t0:.0f}s")
        name = ref.rsplit(":", 1)[0]
        prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", name) + "_"
        for old in tars.glob(f"{prefix}*.tar"):
            if old != tar:
                old.unlink(missing_ok=True)
                old.with_name(old.name + ".id").unlink(missing_ok=True)
        return tar


# ---- small helpers -------------------------------------------------------------------------
def image_id(ref: str, missing_ok: bool = False) -> str | None:
    got = docker("image", "inspect", "--format", "{{.Id}}", ref, check=not missing_ok)
    return got.stdout.strip() if got.returncode == 0 else None


def image_size(ref: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())


def _label(ref: str, label: str) -> str | None:
    got = docker("image", "inspect", "--format", "{{json .Config.Labels}}", ref, check=False)
    if got.returncode != 0:
        return None
    return (json.loads(got.stdout) or {}).get(label)


def _images_dir() -> Path:
    d = paths.cache_dir() / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _log_path(what: str) -> Path:
    (_images_dir() / "logs").mkdir(exist_ok=True)
    return _images_dir() / "logs" / f"{what}.log"


def _record_path() -> Path:
    return _images_dir() / "built.json"


def _record() -> dict:
    try:
        return json.loads(_record_path().read_text())
    except (OSError, ValueError):
        return {}


_held: dict[str, int] = {}
_held_lock = threading.Lock()


def _busy() -> bool:
    """Whether another process holds a build, save or dockerd lock."""
    for path in (paths.cache_dir() / "images").glob(".*.lock"):
        with open(path, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """A lock file under the cache: one builder at a time across processes (re-entrant)."""
    with _held_lock:
        depth = _held.get(name, 0)
        _held[name] = depth + 1
    try:
        if depth:
            yield
            return
        path = paths.cache_dir() / "images" / f".{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
    finally:
        with _held_lock:
            _held[name] -= 1


def _stream(argv: list[str], on_line: Callable[[str], None], *, log: Path, what: str,
            progress: Progress, env: dict[str, str] | None = None,
            heartbeat: float = 30.0) -> None:
    """Run ``argv``, full output to ``log``; each line to ``on_line``; a line every
    ``heartbeat`` seconds of silence so a long step does not look hung."""
    t0 = time.monotonic()
    lines: queue.Queue[str | None] = queue.Queue()
    with open(log, "w") as logf:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, text=True, errors="replace")

        def pump() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        tail: list[str] = []
        while True:
            try:
                line = lines.get(timeout=heartbeat)
            except queue.Empty:
                progress(f"  ... {what}: {time.monotonic() - t0:.0f}s")
                continue
            if line is None:
                break
            logf.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            on_line(line.rstrip("\n"))
        rc = proc.wait()
    if rc != 0:
        raise LabError(f"{what} failed (exit {rc}); full log: {log}\n" + "\n".join(tail))


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _remove_tree(path: Path) -> None:
    """rm -rf, after unmounting anything left mounted below it (an interrupted debootstrap
    leaves /proc and /sys mounted in its target)."""
    if not path.exists():
        return
    root = str(path.resolve())
    with open("/proc/mounts") as f:
        mounts = [line.split()[1].encode().decode("unicode_escape") for line in f]
    for m in sorted((m for m in mounts if m == root or m.startswith(root + "/")), reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _clip(text: str, n: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---- command line --------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m phoenix_lab.images [build|save|docker|stop]``."""
    ap = argparse.ArgumentParser(prog="python -m phoenix_lab.images", description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", nargs="?", default="build", choices=("build", "save", "docker", "stop"),
                    help="build (default): dockerd + every image; save: also the docker-save tars; "
                         "docker: start dockerd and print its DOCKER_HOST; stop: stop dockerd")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "stop":
            say("dockerd stopped" if stop_docker() else "dockerd was not running")
            return 0
        host = ensure_docker()
        if args.cmd == "docker":
            print(f"export DOCKER_HOST={host}")
            return 0
        t0 = time.monotonic()
        pause = ensure_pause_image()
        built = ensure_project_images()
        result = {"docker_host": host, "base": BASE_IMAGE, "pause": pause,
                  "images": {k: asdict(v) for k, v in built.items()}}
        if args.cmd == "save":
            result["tars"] = {ref: str(save_image(ref))
                              for ref in [pause, *(v.ref for v in built.values())]}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for b in built.values():
                print(f"{b.ref:34} {b.id[:19]}  {_human(b.size):>9}  "
                      f"{'built %.0fs' % b.seconds if b.built else 'cached'}")
            print(f"{pause:34} {image_id(pause)[:19]}  {_human(image_size(pause)):>9}")
            for ref, tar in result.get("tars", {}).items():
                print(f"{ref:34} -> {tar}")
            print(f"export DOCKER_HOST={host}   # {time.monotonic() - t0:.0f}s")
    except LabError as e:
        print(f"images: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
