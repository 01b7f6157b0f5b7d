#!/usr/bin/env bash
# Everything the end-to-end suite needs besides the dev venv: the vLLM (CPU build) venv, the
# LiteLLM venv and the tiny test models. Each step reuses what is already there.
#
#   VLLM_VENV, LITELLM_VENV, MODELS_DIR   see the scripts called below
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

VLLM_VENV="${VLLM_VENV:-$HOME/.cache/vllm-model-router/venv-vllm}"
export VLLM_VENV LITELLM_VENV="${LITELLM_VENV:-$HOME/.cache/vllm-model-router/venv-litellm}"
export MODELS_DIR="${MODELS_DIR:-$HOME/.cache/vllm-model-router/models}"

scripts/setup_vllm_cpu.sh
scripts/setup_litellm.sh
t0=$(date +%s)
"$VLLM_VENV/bin/python" scripts/make_tiny_models.py --out "$MODELS_DIR"
echo "[prepare_e2e] models checked/made in $(( $(date +%s) - t0 )) s" >&2
echo "[prepare_e2e] ready in $(( $(date +%s) - start )) s" >&2
