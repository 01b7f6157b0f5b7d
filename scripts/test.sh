#!/usr/bin/env bash
# Sets up everything the tests need and runs them: lint and types, the fast suite (unit + integration
# against fake-engine subprocesses), then the end-to-end suite against a real vLLM (CPU build) and a
# real LiteLLM proxy. `--fast` skips the end-to-end suite.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/setup_dev.sh
echo "==> ruff + mypy + hadolint"
.venv/bin/ruff check src tests bench
.venv/bin/mypy src
.venv/bin/hadolint --failure-threshold info Dockerfile
echo "==> fast suite"
# the browser tests' screenshots are kept here (an ignored folder a CI job can collect)
export TEST_ARTIFACTS="${TEST_ARTIFACTS:-$PWD/test-results/artifacts}"
.venv/bin/python -m pytest -q
echo "==> fast suite done in $(( $(date +%s) - start ))s"
if [[ "${1:-}" != "--fast" ]]; then
  PYTHON="$PWD/.venv/bin/python" scripts/run_e2e.sh
fi
echo "==> all tests passed in $(( $(date +%s) - start ))s"
