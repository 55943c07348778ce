#!/usr/bin/env bash
# bf16 vs fp32 accuracy check (issue 12, item 3): the shipped generator on every test item of the 13 seen tasks
# (3 templates each, 2,340 prompts), one seed, once per target dtype. An accuracy check, not a timing:
# run at nice 19 on the shared 2-core CPU VM. Usage: bench/eval/bf16/run.sh [python]
set -euo pipefail
PY=${1:-python}
SEEN="sentiment_rt sentiment_imdb subjectivity_rt country_capital country_continent country_currency antonym
      word_uppercase word_first_letter word_last_letter next_number two_digit_sum number_parity"
for dtype in float32 bfloat16; do
  nice -n 19 "$PY" -m atv_core.cli eval --seeds 0 --methods atv --generator atv_core/default_generator \
    --generic none --tasks $SEEN --dtype "$dtype" --out "bench/eval/bf16/$dtype"
done
