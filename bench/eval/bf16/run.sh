#!/usr/bin/env bash
# bf16 vs fp32 accuracy check (issue 12, item 3): the shipped generator on the 13 seen tasks, every item under
# each of its 3 templates, one seed, once per target dtype; the same items in both, so the difference is paired.
#   bench/eval/bf16/run.sh PYTHON limit10   the first 10 test items per task (390 prompts; the README's protocol)
#   bench/eval/bf16/run.sh PYTHON full      every test item (2,340 prompts)
#   a third argument names the output folder (default bench/eval/bf16/SET)
# An accuracy check, not a timing: run at nice 19 on the shared 2-core CPU VM.
set -euo pipefail
PY=${1:-python}
SET=${2:-limit10}
OUT=${3:-bench/eval/bf16/$SET}
LIMIT=(); [ "$SET" = limit10 ] && LIMIT=(--limit 10)
SEEN="sentiment_rt sentiment_imdb subjectivity_rt country_capital country_continent country_currency antonym
      word_uppercase word_first_letter word_last_letter next_number two_digit_sum number_parity"
for dtype in float32 bfloat16; do
  nice -n 19 "$PY" -m atv_core.cli eval --seeds 0 --methods atv --generator atv_core/default_generator \
    --generic none "${LIMIT[@]}" --tasks $SEEN --dtype "$dtype" --out "$OUT/$dtype"
done
