#!/usr/bin/env bash
# The main job: set-up (seconds when warm), then serve SmolLM2-135M-Instruct on CPU with
# eviction on, send long-context questions through the OpenAI API and print the savings, then
# keep serving until Ctrl-C. Extra arguments go to `vllm serve` (e.g. --kv-budget 0.2).
#   KVEVICT_DEMO_ONLY=1  stop the server after the demo requests
#   KVEVICT_PORT=8000    port to serve on
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/env.sh"
PORT=${KVEVICT_PORT:-8000}
LOG=${KVEVICT_LOG:-/tmp/vllm-kvevict-serve.log}

vllm serve "$KVEVICT_MODEL_DIR" --port "$PORT" --dtype float32 --max-model-len 8192 \
  --block-size 32 --kv-cache-memory-bytes 1073741824 \
  --kv-eviction criticalkv --kv-budget 0.1 "$@" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
echo "[run] vllm serve started (pid $SERVER, log $LOG); waiting for it to be ready"
for _ in $(seq 1 300); do
  if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then tail -40 "$LOG"; echo "[run] the server exited"; exit 1; fi
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { tail -40 "$LOG"; echo "[run] not ready after 300 s"; exit 1; }
python "$ROOT/scripts/demo_request.py" --base-url "http://127.0.0.1:$PORT" --model "$KVEVICT_MODEL_DIR"
if [ "${KVEVICT_DEMO_ONLY:-0}" = "1" ]; then exit 0; fi
echo "[run] serving on http://127.0.0.1:$PORT (Ctrl-C to stop; log $LOG)"
wait $SERVER
