#!/usr/bin/env bash
# Quick start: sets up .venv and runs the router on examples/demo.yaml (fake engines, no GPU needed).
# Then, from another terminal:
#   curl localhost:8010/v1/chat/completions -H 'Content-Type: application/json' \
#        -d '{"model": "chat-small", "messages": [{"role": "user", "content": "hello"}]}'
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_dev.sh --no-test-deps
export PATH="$PWD/.venv/bin:$PATH"
exec vllm-model-router serve --config "${1:-examples/demo.yaml}"
