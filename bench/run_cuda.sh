#!/usr/bin/env bash
# The same benchmarks on a CUDA machine (bf16 by default there), same workload as the CPU figures.
# Usage: bash bench/run_cuda.sh [OUT_DIR]   (needs a venv with a CUDA torch: pip install torch, then pip install -e .)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -m atv_core.cli bench engine --device cuda --json "$OUT/engine_cuda.json"
"$PY" -m atv_core.cli bench engine --device cuda --requests 256 --new-tokens 128 --json "$OUT/engine_cuda_256.json"
"$PY" -m atv_core.cli bench serve --device cuda --max-running 64 --json "$OUT/serve_cuda.json" --plot "$OUT/serve_cuda.png"
"$PY" -m atv_core.cli bench engine --device cuda --scenario mixed --json "$OUT/engine_cuda_mixed.json"
