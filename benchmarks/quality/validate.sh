#!/usr/bin/env bash
# docs/VALIDATION.md: laprox and value_aware against attention-only and other comparators at the
# budgets their papers report on (5-20%), question inside the prompt (what a served user gets),
# reference engine, head granularity, no floor (min_tokens 0: the papers' fractional budgets),
# ~1k-token prompts of the kinds SmolLM2 answers at full cache, seed 2 (tasks 200,006 + i: disjoint
# from the LKV training/validation seeds, docs/LKV.md, and from seed 0 of RESULTS.md/FLOOR.md).
# Staged by prompts per kind (4, 8, ... N) so a stopped run stays balanced over kinds; resumable
# (a rerun skips rows already in the folder). Then the allocation control: laprox and value_aware
# under adakv (snapkv's default), snapkv under uniform (value_aware's default).
#
#   bash benchmarks/quality/validate.sh            # N=12: 36 prompts per cell
#   N=4 bash benchmarks/quality/validate.sh        # the small default: 12 prompts per cell
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/env.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-benchmarks/quality/results/validate-inside}
N=${N:-12}
COMMON=(--target reference --out "$OUT" --engine-name validate-inside --protocol prompt
        --kinds niah_single,niah_multivalue,qa --lengths 1024 --seed 2 --budgets 0.05,0.1,0.2
        --min-tokens 0 --granularities head --workers "${WORKERS:-2}" --no-report)
for n in $(seq 4 4 "$N"); do
  python benchmarks/quality/run.py "${COMMON[@]}" --n-per "$n" \
    --policies laprox,value_aware,snapkv,criticalkv,keydiff,expected_attention,streamingllm
done
for n in $(seq 4 4 "$N"); do
  python benchmarks/quality/run.py "${COMMON[@]}" --n-per "$n" --policies laprox,value_aware --allocations adakv
  python benchmarks/quality/run.py "${COMMON[@]}" --n-per "$n" --policies snapkv --allocations uniform
done
python benchmarks/quality/report.py "$OUT" > /dev/null
python benchmarks/quality/validate_table.py "$OUT" --baseline snapkv:adakv --baseline snapkv:uniform
# the descriptive 2k slice (2 prompts per kind, defaults only; SKIP_2K=1 skips it)
if [ "${SKIP_2K:-0}" != 1 ]; then
  OUT2K=${OUT2K:-benchmarks/quality/results/validate-inside-2k}
  python benchmarks/quality/run.py --target reference --out "$OUT2K" --engine-name validate-inside-2k --protocol prompt \
    --kinds niah_single,niah_multivalue,qa --lengths 2048 --n-per 2 --seed 2 --budgets 0.05,0.1,0.2 \
    --min-tokens 0 --granularities head --workers "${WORKERS:-2}" --no-report \
    --policies laprox,value_aware,snapkv,criticalkv,keydiff
  python benchmarks/quality/report.py "$OUT2K" > /dev/null
  python benchmarks/quality/validate_table.py "$OUT2K"
fi
