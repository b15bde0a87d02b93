# Phoenix operator image: kopf, the Kubernetes client, prometheus-client and the torch-free
# core of phoenix_trainer (phoenix_trainer/core/: contract, storage, layout, handshake) the
# operator verifies checkpoints and writes fences with. Never torch: only the core
# dependencies and the `operator` extra, checked in the build stage.
#
#   docker build -t phoenix-operator:dev .
#   docker build --build-arg PYTHON_IMAGE=phoenix-python-base:bookworm -t phoenix-operator:dev .
#
# PYTHON_IMAGE is any Debian-based image with python3 (>= 3.11, for tomllib) and its venv
# module; the lab builds one with debootstrap (lab/phoenix_lab/images.py), since no
# registry is reachable there. No `# syntax=` line on purpose: it would make BuildKit pull
# a frontend image from a registry; the daemon's built-in frontend parses this file.
#
# The Helm chart sets the command explicitly (python -m kopf + run arguments); the CMD here
# makes `docker run IMAGE` do the same, and `docker run IMAGE python -m kopf run ...` (no
# ENTRYPOINT in front of it) work as written.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- the dependency list alone, from pyproject.toml (core + the `operator` extra + the build
# backend): the install below is keyed on the list's bytes, not on the whole pyproject.toml
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb')); \
print('\n'.join(p['build-system']['requires'] + p['project']['dependencies'] \
+ p['project']['optional-dependencies']['operator']))" > /tmp/requirements.txt

# --- build: a virtualenv with the operator and its dependencies ---------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# The runtime's user gets a passwd/group entry (copied into the runtime stage below) for
# tools that look the uid up; the runtime's USER/LOGNAME/HOME cover any other uid too.
RUN python -m venv /opt/venv \
 && groupadd --gid 65532 phoenix \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin phoenix
WORKDIR /src
# Dependencies first, so a code edit rebuilds only the small layers after this one.
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
COPY pyproject.toml ./
COPY README.md ./
COPY operator/phoenix_operator/ operator/phoenix_operator/
COPY trainer_image/phoenix_trainer/ trainer_image/phoenix_trainer/
# pip byte-compiles what it installs (PYTHONDONTWRITEBYTECODE does not stop that); the root
# filesystem is read-only at run time, so .pyc files must exist now.
RUN pip install --no-deps --no-build-isolation . \
 && PYTHONDONTWRITEBYTECODE=1 python -c "import phoenix_operator.main, sys; assert 'torch' not in sys.modules" \
 && if pip show torch >/dev/null 2>&1; then echo "torch must not be in the operator image" >&2; exit 1; fi

# --- runtime: the same base, the venv and the user entry, nothing else ----------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="phoenix-operator" \
      org.opencontainers.image.description="Phoenix operator: recovers preempted GPU training jobs" \
      org.opencontainers.image.licenses="Apache-2.0"
# USER/LOGNAME: kopf names itself `getpass.getuser()`@host (peering.detect_own_id), which
# reads these before it asks the passwd database; without them a uid with no passwd entry
# (runAsUser other than 65532) dies at start-up with "getpwuid(): uid not found".
# HOME: the root filesystem is read-only; /tmp is the chart's emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    USER=phoenix \
    LOGNAME=phoenix \
    HOME=/tmp
COPY --from=build /etc/passwd /etc/group /etc/
COPY --from=build /opt/venv /opt/venv
# Numeric uid/gid so Kubernetes can verify runAsNonRoot; matches the chart's securityContext.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 8081
CMD ["python", "-m", "kopf", "run", "--module=phoenix_operator.main", "--standalone", \
     "--all-namespaces", "--liveness=http://0.0.0.0:8081/healthz"]
