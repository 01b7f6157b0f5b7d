#!/usr/bin/env bash
# End-to-end suite: the router as a real process in front of real vLLM servers (CPU build, tiny
# random-weight models) and a real LiteLLM proxy. Prepares what is missing first.
#
#   PYTHON   the dev venv's interpreter (default: .venv/bin/python); extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY="${PYTHON:-$PWD/.venv/bin/python}"

scripts/prepare_e2e.sh
echo "==> end-to-end suite"
rc=0
"$PY" -m pytest -m e2e tests/e2e -v "$@" || rc=$?
echo "==> end-to-end suite finished (exit $rc) in $(( $(date +%s) - start ))s"
exit "$rc"
