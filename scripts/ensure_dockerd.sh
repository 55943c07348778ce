#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine; install and start one if not.
#
#   scripts/ensure_dockerd.sh      # exit 0 once `docker info` works, non-zero (with the reason) if it cannot
#
# Does: nothing when `docker info` already works. Otherwise installs Debian's docker.io (apt-get, as root
# or through sudo) when dockerd is missing, starts `dockerd` in the background (log: $DOCKERD_LOG,
# default /var/log/atv-dockerd.log) and waits up to $DOCKERD_WAIT seconds (default 60) for it.
# Does not: configure a registry, enable BuildKit, or stop the daemon afterwards (CI reuses it, and its
# layer cache, on the next run).
set -euo pipefail

DOCKERD_LOG="${DOCKERD_LOG:-/var/log/atv-dockerd.log}"
DOCKERD_WAIT="${DOCKERD_WAIT:-60}"

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # log, die, as_root

engine_up() { docker info >/dev/null 2>&1; }

install_docker() {
  log "installing Debian's docker.io (apt-get)"
  as_root apt-get update -qq || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io \
    || die "apt-get install docker.io failed"
}

start_dockerd() {
  log "starting dockerd in the background (log: $DOCKERD_LOG)"
  as_root sh -c "setsid nohup dockerd >>'$DOCKERD_LOG' 2>&1 </dev/null &" || die "could not start dockerd"
}

wait_for_engine() {
  local waited=0
  until engine_up; do
    [ "$waited" -lt "$DOCKERD_WAIT" ] || die "dockerd did not answer within ${DOCKERD_WAIT}s; last log lines:
$(tail -n 20 "$DOCKERD_LOG" 2>/dev/null)"
    sleep 1
    waited=$((waited + 1))
  done
}

if engine_up; then
  exit 0
fi
command -v docker >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1 || install_docker
# A dockerd that is already starting (ours from an earlier run, or someone else's) is waited for, not doubled.
pgrep -x dockerd >/dev/null 2>&1 || start_dockerd
wait_for_engine
log "docker engine up: $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
