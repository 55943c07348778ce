#!/usr/bin/env bash
# bf16 vs fp32 accuracy check (issue 12, item 3): the shipped generator on the first 10 test items of each of
# the 13 seen tasks under each of its 3 templates (390 prompts; the README's `--limit 10` protocol), one seed,
# once per target dtype. A subset: the full seen set (2,340 prompts) had not finished its fp32 pass after
# 20 minutes at nice 19 on the shared machine. An accuracy check, not a timing: run at nice 19 on the shared
# 2-core CPU VM. Usage: bench/eval/bf16/run.sh [python]
set -euo pipefail
PY=${1:-python}
SEEN="sentiment_rt sentiment_imdb subjectivity_rt country_capital country_continent country_currency antonym
      word_uppercase word_first_letter word_last_letter next_number two_digit_sum number_parity"
for dtype in float32 bfloat16; do
  nice -n 19 "$PY" -m atv_core.cli eval --seeds 0 --methods atv --generator atv_core/default_generator \
    --generic none --limit 10 --tasks $SEEN --dtype "$dtype" --out "bench/eval/bf16/$dtype"
done
