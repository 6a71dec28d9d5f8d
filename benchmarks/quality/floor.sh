#!/usr/bin/env bash
# The measurement behind the default of min_tokens (benchmarks/quality/FLOOR.md): criticalkv and
# snapkv (head granularity, their plugin default) and streamingllm (page granularity, its plugin
# default) at budgets 0.1 and 0.2 under floors 0 (off) to 512, beside the full cache, on the
# kinds SmolLM2 answers at full cache (single needle, multi-value needle, document question).
# Question inside the prompt (what a served user gets) at ~900 and ~2048 tokens; question after
# eviction at ~900. Resumable (a rerun skips rows already in the folder).
#
#   bash benchmarks/quality/floor.sh          # blocks of 32 (whole pages per head) -> results/floor-bs32
#   BLOCK=128 bash benchmarks/quality/floor.sh  # vLLM CPU's default block (single tokens per head) -> results/floor
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/env.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
BLOCK=${BLOCK:-32}
if [ "$BLOCK" = 128 ]; then DEFAULT_OUT=benchmarks/quality/results/floor; else DEFAULT_OUT=benchmarks/quality/results/floor-bs$BLOCK; fi
OUT=${OUT:-$DEFAULT_OUT}
COMMON=(--target reference --out "$OUT" --kinds niah_single,niah_multivalue,qa --budgets 0.1,0.2
        --block-size "$BLOCK" --workers "${WORKERS:-2}" --no-report)
# protocol, context tokens, prompts per kind, floors
RUNS=("prompt 900 4 0,128,192,256,384,512" "prompt 2048 2 0,128,256" "context 900 2 0,128,256")
for run in "${RUNS[@]}"; do
  read -r protocol length n floors <<<"$run"
  for group in "criticalkv,snapkv:head" "streamingllm:page"; do
    python benchmarks/quality/run.py "${COMMON[@]}" --protocol "$protocol" --lengths "$length" --n-per "$n" \
      --min-tokens "$floors" --policies "${group%%:*}" --granularities "${group##*:}"
  done
done
python benchmarks/quality/report.py "$OUT" > /dev/null
python benchmarks/quality/floor_table.py "$OUT"
