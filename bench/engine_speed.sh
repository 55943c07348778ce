#!/usr/bin/env bash
# Engine-speed figures (issue 12) on this CPU machine, embedded default target (SmolLM2-135M), 32 requests x 64
# tokens, greedy, EOS ignored; every figure a median over 5 interleaved rounds, with its spread.
#   1. atv bench engine -> bench/engine_cpu_speed.json: engine ATV / off (also staggered arrivals), the closed-batch
#      transformers `generate` baseline steered and not, ATV at 64 requests with max_running 64 (moonshot),
#      the per-step cost of steering alone (one decode batch of 32, 30 x steered and unsteered), sequential
#      hooked generate and generate_batch (one run each).
#   2. atv bench serve  -> bench/serve_cpu_speed.json: HTTP at concurrency 32, ATV / off and TTFT(atv) - TTFT(off),
#      per round and from paired waves of 32 one-token requests.
# NOTHING ELSE MAY RUN ON THE MACHINE while this runs (no tests, builds, other sessions): the figures are
# only worth the quiet they were taken in. It refuses to start when the 1-minute load average is above 1.0
# (FORCE=1 overrides; say so next to the figures).
# Usage (from the repo root): bash bench/engine_speed.sh
#   env: PY (default .venv/bin/python), DTYPE (default float32), ROUNDS (default 5), MOONSHOT (default 64; 0 skips),
#        WAVES (default 60: paired one-token waves of 32 for TTFT(atv) - TTFT(off), about 1 s each; 0 skips)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
DTYPE="${DTYPE:-float32}"
ROUNDS="${ROUNDS:-5}"
MOONSHOT="${MOONSHOT:-64}"
WAVES="${WAVES:-60}"
SUFFIX=$([ "$DTYPE" = float32 ] && echo "" || echo "_$DTYPE")
ENGINE_JSON="bench/engine_cpu_speed$SUFFIX.json"
SERVE_JSON="bench/serve_cpu_speed$SUFFIX.json"

load=$(cut -d' ' -f1 /proc/loadavg)
bf16=$(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx512_bf16|amx_bf16' | tr '\n' ' ' || true)
echo "machine: $(hostname), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'),"\
     "bf16 instructions: ${bf16:-none}"
echo "load average (1 min): $load; date: $(date -u +%FT%TZ); git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if awk "BEGIN {exit !($load > 1.0)}" && [ "${FORCE:-0}" != 1 ]; then
  echo "refusing: the machine is busy (load $load > 1.0). Stop everything else, or FORCE=1 and report it." >&2
  exit 1
fi
# Expected time, from this project's earlier figures on its 2-core VM (engine ~240 tok/s, closed batch ~250,
# HTTP ~160 at concurrency 32, generate_batch ~70): engine ~51 s per round + moonshot ~15 s per round,
# + ~70 s once (loading, step cost, single-run baselines); serve ~52 s per round + ~30 s once.
expected=$(( (51 * ROUNDS + (MOONSHOT > 0 ? 15 * ROUNDS : 0) + 70 + 52 * ROUNDS + 2 * WAVES + 30) / 60 + 1 ))
echo "expected duration: about $expected min on the 2-core VM (ROUNDS=$ROUNDS, DTYPE=$DTYPE, MOONSHOT=$MOONSHOT)"
echo "NOTHING ELSE MAY RUN on this machine until it prints 'done'."
start=$(date +%s)

"$PY" -m atv_core.cli bench engine --device cpu --dtype "$DTYPE" --requests 32 --new-tokens 64 --rounds "$ROUNDS" \
  --moonshot-requests "$MOONSHOT" --step-repetitions 30 --naive-requests 4 --json "$ENGINE_JSON"
echo "engine part: $(( $(date +%s) - start )) s"

"$PY" -m atv_core.cli bench serve --device cpu --dtype "$DTYPE" --concurrency 32 --new-tokens 64 \
  --rounds "$ROUNDS" --max-running 64 --ttft-concurrency 32 --ttft-waves "$WAVES" --no-baselines \
  --json "$SERVE_JSON" --plot ""
echo "done in $(( $(date +%s) - start )) s: $ENGINE_JSON, $SERVE_JSON"
