#!/usr/bin/env bash
# Uniform throughput, old vs new engine side by side: one process per round, trees alternated within a round.
# Usage: OLD_TREE=<checkout of the older commit> [ROUNDS=5] bash bench/uniform_ab.sh   (from the repo root)
# Run it with nothing else on the machine; it prints one RESULT line per process.
set -u
NEW_TREE=$(pwd); PY=${PY:-$NEW_TREE/.venv/bin/python}
for i in $(seq 1 "${ROUNDS:-5}"); do
  (cd "$OLD_TREE" && PYTHONPATH="$OLD_TREE" "$PY" "$NEW_TREE/bench/uniform_ab.py" old 2>/dev/null | grep RESULT)
  (PYTHONPATH="$NEW_TREE" "$PY" bench/uniform_ab.py paged 2>/dev/null | grep RESULT)
done
