#!/usr/bin/env bash
# summary.json / summary.md of every committed results folder again from its result rows (no run,
# no plot: the plots are unchanged), so every summary row carries run, engine (reference, kvpress,
# server, stock), protocol (after / inside) and n. Rows written before rows carried "run" get it
# from their "engine" field and the engine from the folder's meta.json target (grid.normalized).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT/benchmarks/quality"
R=results
report() { python report.py --no-plot "$@" > /dev/null; }
for d in e2e-small e2e-small-kvpress e2e-small-vllm floor floor-bs32 prelim-all-scorers reference \
         reference-kvsettings vector-after vector-after-s1 vector-inside vector-inside-s1 vector-share0.02-after \
         vector-relative-after vector-relative-after-s1 vector-relative-inside vector-relative-inside-s1 \
         vector-gated-after vector-gated-after-s1 vector-gated-inside vector-gated-inside-s1 \
         plugin-vs-reference/reference plugin-vs-reference/server plugin-vs-reference/server-3a62c8d validate-inside validate-inside-2k; do
  report "$R/$d" --out "$R/$d"
done
report $R/kvpress $R/reference-kvsettings --out $R/kvpress --compare kvpress,reference-kvsettings   # kvpress_compare.sh's pair
report $R/e2e-small $R/e2e-small-kvpress $R/e2e-small-reference-prompt-page $R/e2e-small-vllm --out $R/e2e-small-all
# RESULTS.md's and VECTOR.md's commands
report $R/reference $R/kvpress $R/reference-kvsettings $R/lkv-after $R/lkv-inside $R/validate-inside $R/validate-inside-2k --out . --compare kvpress,reference-kvsettings
python self_recall.py --report-only > /dev/null   # SELF_RECALL.md: its rows of ./summary.json again (protocol self-recall)
report $R/vector-after $R/vector-inside $R/vector-after-s1 $R/vector-inside-s1 --out vector
report $R/vector-after $R/vector-inside $R/vector-after-s1 $R/vector-inside-s1 $R/vector-relative-{after,inside}{,-s1} \
  $R/vector-gated-{after,inside}{,-s1} --out vector/gates   # VECTOR.md's "Gates"
