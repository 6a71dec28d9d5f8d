#!/bin/bash
# On the GPU machine: vLLM 0.26's Python tree + its wheels + FA3 into /tmp/site, from .stage/py and
# .stage/c2 (made here by benchmarks/kernels/stage_vllm.sh). vLLM's core extension stays behind:
# platforms/cuda.py imports it, so an empty module stands in for it; the kernel benchmark calls
# only vLLM's Triton unified_attention and FA3 (its own .so). Not for serving.
set -euo pipefail
mkdir -p /tmp/site
python3 -c "import tarfile; tarfile.open('.stage/py/vllm026_py.tar.xz').extractall('/tmp/site', filter='fully_trusted')"
echo "# stand-in: the core extension is not carried (kernel benchmarks only)" > /tmp/site/vllm/_C_stable_libtorch.py
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .stage/c2/whl/*.whl
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.stage/c2/fa3.so.xz'), open('/tmp/site/vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so', 'wb'), 1 << 24)"
