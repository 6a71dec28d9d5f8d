# Sourced by the set-up and the README's commands: where the venv and the model live.
_KVEVICT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KVEVICT_VENV="${KVEVICT_VENV:-$_KVEVICT_ROOT/.venv}"
export KVEVICT_MODEL_DIR="${KVEVICT_MODEL_DIR:-$HOME/.cache/vllm-kvevict/SmolLM2-135M-Instruct}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PATH="$KVEVICT_VENV/bin:$PATH"
