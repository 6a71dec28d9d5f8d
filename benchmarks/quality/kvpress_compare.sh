#!/usr/bin/env bash
# kvpress 0.5.5 beside the reference engine on the methods both implement, with the same
# definitions (RESULTS.md's comparison table). Ten methods: SnapKV, AdaKV (= snapkv+adakv_floor),
# CriticalKV, CriticalAdaKV, PyramidKV (reference only: see below), StreamingLLM, KNorm, KeyDiff,
# ExpectedAttention, TOVA.
# The reference runs with --kvpress-settings (kvpress's windows for knorm/keydiff/
# expected_attention/tova) under its own engine label, so its rows never pool with the default
# sweep's. Resumable (each run skips rows already in its folder).
#
#   bash benchmarks/quality/kvpress_compare.sh [TARGET ...]     # TARGET: kvpress and/or reference
#
# Subset (kvpress prefills once per setting: ~5 CPU-s a row at 1k against the reference's ~2):
# SUBSETS below: 7 prompts at 1024 tokens x 37 settings (41 for the reference, with PyramidKV).
# WORKERS=2 runs two processes (one per core).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/env.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SUBSET_ARGS=(--lengths 1024 --budgets 1,0.5,0.2,0.1,0.05 --workers "${WORKERS:-1}" --no-report)
# two prompt sets (the second adds prompts the full cache answers); overlaps are skipped
SUBSETS=("--kinds niah_single,niah_multikey,vt,qa --n-per 1" "--kinds niah_single,niah_multivalue,qa --n-per 2")
GROUPS_=("snapkv,criticalkv:uniform,adakv_floor"
         "knorm,keydiff,expected_attention,tova,streamingllm:uniform"
         "pyramidkv:default")
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(kvpress reference)
for target in "${targets[@]}"; do
  case "$target" in
    kvpress) out=benchmarks/quality/results/kvpress; extra=() ;;
    reference) out=benchmarks/quality/results/reference-kvsettings
               extra=(--kvpress-settings --engine-name reference-kvsettings --granularities head-token) ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
  for subset in "${SUBSETS[@]}"; do
  for group in "${GROUPS_[@]}"; do
    # kvpress's PyramidKVPress leaves layers with different cache lengths, which its pipeline's
    # question pass can attend only with flash-attention 2 (no mask): on CPU (sdpa) it fails
    # with "size of tensor a (958) must match ... (990)" (transformers#35168). Reference only.
    [ "$target" = kvpress ] && [ "${group%%:*}" = pyramidkv ] && continue
    python benchmarks/quality/run.py --target "$target" --out "$out" "${SUBSET_ARGS[@]}" "${extra[@]}" \
      --policies "${group%%:*}" --allocations "${group##*:}" $subset
  done
  done
  python benchmarks/quality/report.py "$out" > /dev/null
done
