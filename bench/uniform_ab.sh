#!/usr/bin/env bash
# Alternate old (pre-paged main, ef4216f) and new engine (budget 512 and 256), one process per round.
for i in $(seq 1 ${ROUNDS:-3}); do
  (cd /work/wt/old && PYTHONPATH=/work/wt/old /work/main/.venv/bin/python /work/notes/uniform_ab.py old 2>/dev/null | grep RESULT)
  (cd /work/main && PYTHONPATH=/work/main /work/main/.venv/bin/python /work/notes/uniform_ab.py paged512 2>/dev/null | grep RESULT)
  (cd /work/main && BUDGET=256 PYTHONPATH=/work/main /work/main/.venv/bin/python /work/notes/uniform_ab.py paged256 2>/dev/null | grep RESULT)
done
