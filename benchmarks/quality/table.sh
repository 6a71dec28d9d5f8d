#!/usr/bin/env bash
# The quality table (benchmarks/quality/TABLE.md): both protocols from one prefill per prompt (question
# after eviction and question inside the prompt), reference engine, head granularity on blocks of 32
# (whole pages per head: the plugin's selection at blocks up to 32, vLLM-CPU serving's --block-size
# 32 as in SERVED.md; at 128 a head would keep single tokens), the default floor, seeds 4 / 6 / 7 at 1k / 2k / 4k (tasks 400,012 + i, 600,018 + i, 700,021 + i: disjoint from
# RESULTS.md's seed 0, VALIDATION.md's seed 2, the pilot's 5 and the LKV seeds; one seed per length,
# as a seed's prompts share needles and depths across lengths), prompts of the kinds SmolLM2
# answers at full cache: every RULER-style kind but vt
# at 1k; at 2k and 4k those a full-cache pilot on seed 5 (3 per cell) answered with accuracy >= 0.1:
#   python benchmarks/quality/run.py --target reference --out /tmp/pilot --protocol prompt --policies none \
#     --kinds niah_single,niah_multikey,niah_multivalue,niah_multiquery,cwe,fwe,qa --lengths 4096,2048 --n-per 3 --seed 5
# (2k: cwe 0.00, niah_multikey 0.00, the rest 0.67-1.00; 4k: cwe, niah_multikey, qa 0.00,
# niah_multiquery 0.08, fwe 0.33, niah_multivalue 0.67, niah_single 1.00).
# Prompts go round by round over length x kind, so a run stopped by TIME_LIMIT (seconds) holds
# about as many of each; resumable (a rerun skips rows already in the folder, and a larger N
# extends the suite without changing its first prompts).
#
#   bash benchmarks/quality/table.sh           # small default (~10 min on 2 cores): 1k and 2k, 1 per kind
#   FULL=1 bash benchmarks/quality/table.sh    # 1k/2k/4k, every scorer, adakv and uniform, N=24 per kind x length
#   FULL=1 POLICIES=criticalkv,snapkv,keydiff,streamingllm,snapkv:uniform ALLOCATIONS=default TIME_LIMIT=5400 \
#     bash benchmarks/quality/table.sh     # the main scorers, and snapkv under uniform beside its adakv
# BUDGETS, VECTOR (off | on | both), OUT and POLICIES add rows in a folder of their own, e.g. LKV's
# learned budgets and VECTOR beside the table's rows on the same prompts (TABLE.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/env.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
KINDS=${KINDS:-niah_single,niah_multikey,niah_multivalue,niah_multiquery,cwe,fwe,qa}
if [ "${FULL:-0}" = 1 ]; then
  OUT=${OUT:-benchmarks/quality/results/table}
  N=${N:-24}; LENGTHS=${LENGTHS:-1024,2048,4096}
  POLICIES=${POLICIES:-all}; ALLOCATIONS=${ALLOCATIONS:-default,uniform}
  KINDS_2K=${KINDS_2K:-niah_single,niah_multivalue,niah_multiquery,fwe,qa}
  KINDS_4K=${KINDS_4K:-niah_single,niah_multivalue,fwe}
else
  OUT=${OUT:-benchmarks/quality/results/table-small}
  N=${N:-1}; LENGTHS=${LENGTHS:-1024,2048}
  POLICIES=${POLICIES:-criticalkv,snapkv,keydiff,streamingllm}; ALLOCATIONS=${ALLOCATIONS:-default}
  KINDS_2K=${KINDS_2K:-niah_single,niah_multivalue,niah_multiquery,fwe,qa}
  KINDS_4K=${KINDS_4K:-$KINDS}
fi
BUDGETS=${BUDGETS:-1,0.5,0.2,0.1,0.05}; VECTOR=${VECTOR:-off}   # VECTOR: off | on | both (run.py --vector)
LIMIT=()
if [ -n "${TIME_LIMIT:-}" ]; then LIMIT=(--time-limit "$TIME_LIMIT"); fi
python benchmarks/quality/run.py --target reference --out "$OUT" --engine-name "$(basename "$OUT")" --protocol both \
  --kinds "$KINDS" --kinds-at "2048=$KINDS_2K" --kinds-at "4096=$KINDS_4K" --lengths "$LENGTHS" --n-per "$N" --seed 4 --seed-at 2048=6 --seed-at 4096=7 --budgets "$BUDGETS" --vector "$VECTOR" \
  --policies "$POLICIES" --allocations "$ALLOCATIONS" --granularities head --block-size 32 --workers "${WORKERS:-2}" --no-report \
  "${LIMIT[@]}"
python benchmarks/quality/report.py "$OUT" > /dev/null
python benchmarks/quality/table_report.py "$OUT"
