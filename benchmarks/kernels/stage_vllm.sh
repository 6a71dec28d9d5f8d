#!/bin/bash
# Here (no GPU): stage vLLM 0.26 for the kernel benchmark's baselines in ONE device call.
# ../shared/gpu-vllm/build.sh makes .stage/c1 (vLLM's Python tree + its 56 MB core extension)
# and .stage/c2 (wheels, FlashAttention-3); c1 and this repository together exceed the 64 MiB a
# call may carry. The baselines need only vLLM's Triton unified_attention and FA3, so this copies
# the Python tree alone to .stage/py. Then, in one call carrying .stage/py and .stage/c2:
#   bash benchmarks/kernels/device_setup.sh && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/kernels/bench.py
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ -f .stage/c1/vllm026_py.tar.xz ] && [ -f .stage/c2/fa3.so.xz ] || bash ../shared/gpu-vllm/build.sh
mkdir -p .stage/py
cp .stage/c1/vllm026_py.tar.xz .stage/py/
du -sh .stage/py .stage/c2
