#!/usr/bin/env bash
# Start vLLM's OpenAI server (CPU build) on one of the tiny test models.
#
#   scripts/vllm_cpu_serve.sh MODEL PORT SERVED_NAME [extra vLLM arguments...]
#
# MODEL is a directory, or a name under $MODELS_DIR (default ~/.cache/vllm-model-router/models).
# The script execs the server, so the PID the router started is the API server itself and
# the engine processes are its children in the same process group.
#
#   VLLM_VENV                venv made by scripts/setup_vllm_cpu.sh
#   VLLM_CPU_KVCACHE_SPACE   KV cache size in GiB (default 1, so several instances fit in RAM)
#   VLLM_MAX_MODEL_LEN       context length (default 512)
set -euo pipefail

if (($# < 3)); then
    echo "usage: $0 MODEL PORT SERVED_NAME [vllm args...]" >&2
    exit 2
fi
model="$1" port="$2" served="$3"
shift 3

VENV="${VLLM_VENV:-$HOME/.cache/vllm-model-router/venv-vllm}"
MODELS_DIR="${MODELS_DIR:-$HOME/.cache/vllm-model-router/models}"
case "$model" in
    */*) model_dir="$model" ;;
    *) model_dir="$MODELS_DIR/$model" ;;
esac

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "vllm_cpu_serve: no vLLM venv at $VENV (run scripts/setup_vllm_cpu.sh)" >&2
    exit 1
fi
if [[ ! -d "$model_dir" ]]; then
    echo "vllm_cpu_serve: no model directory $model_dir (run scripts/make_tiny_models.py)" >&2
    exit 1
fi

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$model_dir" \
    --served-model-name "$served" \
    --host 127.0.0.1 \
    --port "$port" \
    --max-model-len "${VLLM_MAX_MODEL_LEN:-512}" \
    "$@"
