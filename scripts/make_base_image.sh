#!/usr/bin/env bash
# Make a Debian bookworm base image from Debian packages, for machines where no container registry answers.
#
#   scripts/make_base_image.sh [IMAGE]     # default IMAGE: atv-base:bookworm; prints IMAGE on stdout
#
# Does: nothing when IMAGE already exists. Otherwise `debootstrap --variant=minbase` of bookworm with
# python3, python3-venv and ca-certificates (Debian's own CA list, nothing of this machine's) from the
# Debian mirror in this machine's apt sources ($DEBIAN_MIRROR overrides), then `docker import`. Installs
# debootstrap with apt-get when missing. bookworm's python3 is 3.11, like the python:3.11-slim default.
# Does not: pull anything from a registry, or add users, pip or application files (the Dockerfile does).
set -euo pipefail

IMAGE="${1:-atv-base:bookworm}"
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # log, die, as_root

# The first Debian (not -security) URI of this machine's apt sources, deb822 or one-line format.
debian_mirror() {
  local uri
  uri="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
      /^URIs:/ {u=$2} /^Suites:/ {if (u !~ /security/ && u ~ /debian/) {print u; exit}}')"
  [ -n "$uri" ] || uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '
      $1 == "deb" && $2 !~ /security/ && $2 ~ /debian/ {print $2; exit}')"
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  printf '%s\n' "$IMAGE"
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || {
  log "installing debootstrap (apt-get)"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap \
    || die "apt-get install debootstrap failed"
}
MIRROR="${DEBIAN_MIRROR:-$(debian_mirror)}"
ROOTFS="$(mktemp -d /tmp/atv-rootfs.XXXXXX)"
trap 'as_root rm -rf "$ROOTFS"' EXIT
log "debootstrap --variant=minbase --include=$PACKAGES $SUITE from $MIRROR"
as_root debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >&2 \
  || die "debootstrap failed"
# Package caches and the build host's identity stay out of the image.
as_root rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS/etc/hostname" "$ROOTFS/etc/resolv.conf"
log "docker import -> $IMAGE"
as_root tar -C "$ROOTFS" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE $MIRROR" - "$IMAGE" >&2
printf '%s\n' "$IMAGE"
