# syntax=docker/dockerfile:1
# IFA ranking service image (CPU). Targets:
#   runtime (default)  the service; the model artefact is mounted at /app/artifacts
#   baked              the service with the demo model built into /app/artifacts
#   model              a tiny image holding only the demo artefact under /model, for the
#                      Kubernetes initContainer that copies it into the pod (deploy/k8s/README.md)
# Build:  docker build -t ifa-ranking:latest .            (BuildKit skips the unused stages)
#         docker build --target baked -t ifa-ranking:baked .

FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# CPU wheels from PyTorch's own index: the PyPI wheel drags in gigabytes of CUDA libraries that a
# CPU ranker never loads. Its own layer, since it is by far the largest and changes least.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Dependencies before code: this layer is rebuilt only when pyproject.toml changes, not on every
# code edit. torch is already satisfied by the pin above, so pip keeps the CPU build.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY model ./model
COPY service ./service

# Unprivileged user; it owns only the artefact directory (a mounted volume inherits this owner).
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin ifa \
    && mkdir -p /app/artifacts \
    && chown ifa:ifa /app/artifacts
USER 10001:10001

ENV IFA_MODEL_DIR=/app/artifacts \
    IFA_TORCH_THREADS=1

EXPOSE 8000

# slim has no curl; the interpreter is already here. urlopen raises on non-2xx, failing the check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

# The start command of deploy/README.md: one uvicorn worker per container; scale with replicas.
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000", "--model-dir", "artifacts"]


FROM base AS demo-model
# The slim image has no C++ toolchain, so AOTInductor is not among the formats built here.
RUN python -m model.demo --out artifacts --world /tmp/worlds/small-0 --run-dir /tmp/demo-run \
        --formats torchscript,export


FROM busybox:1.36 AS model
COPY --from=demo-model /app/artifacts /model


FROM base AS baked
COPY --from=demo-model --chown=10001:10001 /app/artifacts /app/artifacts


# Last, so that a plain `docker build .` gives the service without a model.
FROM base AS runtime
