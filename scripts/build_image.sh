#!/usr/bin/env bash
# Build this project's images, with or without a container registry.
#
#   scripts/build_image.sh [atv [TAG]]           # the CPU image (`make image`), default TAG atv:cpu
#   scripts/build_image.sh prometheus [TAG]      # Prometheus from Debian's package (`make prometheus-image`),
#                                                # default TAG atv-prometheus:bookworm
# The tag is the last line on stdout; the build log goes to stderr.
#
# Environment:
#   BASE_IMAGE     base image; default: the official one (python:3.11-slim-bookworm, debian:bookworm-slim)
#                  when present or pullable, else the local atv-base:bookworm, made from Debian packages by
#                  scripts/make_base_image.sh when no registry answers.
#   TORCH_VERSION  2.13.0. TORCH_FROM: a package index URL or `wheelhouse`; default `wheelhouse` when
#                  `pip download torch==$TORCH_VERSION+cpu` finds a cp311 wheel (this machine: a local
#                  file), else the Dockerfile's default (download.pytorch.org's CPU index).
#   PY             python whose pip runs `pip download` (default python3).
#   PIP_CERT       CA bundle for pip inside the build (default: this machine's system bundle, when present).
#
# Does: starts dockerd if needed (scripts/ensure_dockerd.sh); for atv, fills deploy/build-inputs/
# (wheelhouse, and pip/pip.conf + the CA bundle unless a pip.conf not written here is already there) and
# tags the builder stage as atv-build:cpu, so that its layers (the next run's build cache) survive the
# prune of this project's superseded images (label atv.image) that ends the script. Legacy builder,
# --network host.
# Does not: push anything, or build the CUDA target (`docker build -t atv:cuda .` where its base exists).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
KIND="${1:-atv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY="${PY:-python3}"
INPUTS="$ROOT/deploy/build-inputs"
LOCAL_BASE=atv-base:bookworm
MARKER="# written by scripts/build_image.sh"
case "$KIND" in
  atv)        TAG="${2:-atv:cpu}";                 OFFICIAL_BASE=python:3.11-slim-bookworm ;;
  prometheus) TAG="${2:-atv-prometheus:bookworm}"; OFFICIAL_BASE=debian:bookworm-slim ;;
  *) echo "usage: $0 [atv|prometheus] [TAG]" >&2; exit 2 ;;
esac

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # log, die, as_root

choose_base() {
  if [ -n "${BASE_IMAGE:-}" ]; then printf '%s\n' "$BASE_IMAGE"; return; fi
  for image in "$OFFICIAL_BASE" "$LOCAL_BASE"; do
    docker image inspect "$image" >/dev/null 2>&1 && { printf '%s\n' "$image"; return; }
  done
  if timeout 120 docker pull -q "$OFFICIAL_BASE" >&2 2>/dev/null; then printf '%s\n' "$OFFICIAL_BASE"; return; fi
  log "no registry answers: making $LOCAL_BASE from Debian packages"
  bash scripts/make_base_image.sh "$LOCAL_BASE" | tail -n 1
}

write_if_changed() {  # write_if_changed FILE < content  (an unchanged file keeps the layer cache warm)
  local tmp; tmp="$(mktemp)"; cat > "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; chmod 644 "$1"; fi
}

fill_pip_config() {
  local conf="$INPUTS/pip/pip.conf" cert="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
  if [ -f "$conf" ] && ! grep -qF "$MARKER" "$conf"; then log "keeping your $conf"; return; fi
  if [ ! -f "$cert" ]; then rm -f "$conf" "$INPUTS/pip/ca-certificates.crt"; return; fi
  write_if_changed "$INPUTS/pip/ca-certificates.crt" < "$cert"
  printf '%s\n[global]\ncert = /build-inputs/pip/ca-certificates.crt\n' "$MARKER" | write_if_changed "$conf"
}

fill_wheelhouse() {  # prints the TORCH_FROM to use ('' = the Dockerfile's default)
  if [ -n "${TORCH_FROM:-}" ]; then printf '%s\n' "$TORCH_FROM"; return; fi
  if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
       --platform manylinux_2_28_x86_64 -d "$INPUTS/wheelhouse" "torch==${TORCH_VERSION}+cpu" >&2; then
    printf 'wheelhouse\n'
  else
    log "no torch ${TORCH_VERSION}+cpu wheel found: torch comes from the Dockerfile's default index"
    printf '\n'
  fi
}

legacy_build() {  # legacy_build ARGS... (BuildKit needs buildx, which Debian's docker.io lacks)
  DOCKER_BUILDKIT=0 docker build --network host --build-arg BASE_IMAGE="$BASE" "$@" >&2
}

build_atv() {
  fill_pip_config
  local torch_from; torch_from="$(fill_wheelhouse)"
  log "building $TAG: BASE_IMAGE=$BASE TORCH_FROM=${torch_from:-(Dockerfile default)}"
  set -- --build-arg TORCH_VERSION="$TORCH_VERSION" ${torch_from:+--build-arg TORCH_FROM="$torch_from"}
  legacy_build "$@" --target cpu-build -t atv-build:cpu .
  legacy_build "$@" --target cpu -t "$TAG" .
}

build_prometheus() {
  log "building $TAG: BASE_IMAGE=$BASE"
  legacy_build -t "$TAG" deploy/prometheus
}

bash scripts/ensure_dockerd.sh
BASE="$(choose_base)"
start=$(date +%s)
"build_$KIND"
log "built $TAG in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
docker image prune -f --filter label=atv.image >/dev/null
printf '%s\n' "$TAG"
