# syntax=docker/dockerfile:1
# Phoenix operator image: kopf, the Kubernetes client, prometheus-client and the torch-free
# part of phoenix_trainer (contract, checkpoint layout, storage) the operator verifies
# checkpoints with. Never torch: `pip install .[operator]` only, checked in the build stage.
#
#   docker build -t phoenix-operator:dev .
#
# The Helm chart sets the command explicitly (python -m kopf run ...); ENTRYPOINT/CMD here
# make `docker run` do the same thing.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- build: a virtualenv with the operator and its dependencies ---------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies change less often than code: metadata first, packages after.
COPY pyproject.toml README.md ./
COPY operator/phoenix_operator/ operator/phoenix_operator/
COPY trainer_image/phoenix_trainer/ trainer_image/phoenix_trainer/
RUN pip install ".[operator]" \
 && python -c "import phoenix_operator.main, sys; assert 'torch' not in sys.modules" \
 && if pip show torch >/dev/null 2>&1; then echo "torch must not be in the operator image" >&2; exit 1; fi

# --- runtime: slim python, the venv, nothing else -----------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="phoenix-operator" \
      org.opencontainers.image.description="Phoenix operator: recovers preempted GPU training jobs" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
# Numeric uid/gid so Kubernetes can verify runAsNonRoot; matches the chart's securityContext.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "kopf"]
CMD ["run", "--module=phoenix_operator.main", "--standalone", "--all-namespaces", \
     "--liveness=http://0.0.0.0:8081/healthz"]
