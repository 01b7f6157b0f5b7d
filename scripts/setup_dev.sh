#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv with the router, its test tools and Ray
# (the ray extra: the cluster backend's tests need it). Reinstalls only when pyproject.toml changed.
# Usage: scripts/setup_dev.sh [--no-test-deps]   (--no-test-deps: the router alone, without Ray either)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="[test,ray]"
[[ "${1:-}" == "--no-test-deps" ]] && extras=""
if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv with $($PY --version)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if [[ -n "$extras" && ! -x /usr/bin/chromium ]]; then
  # the dashboard's browser tests drive Debian's chromium through Playwright (no browser download)
  echo "==> installing chromium (browser tests)"
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
if [[ -n "$extras" && ! -x /usr/bin/promtool ]]; then
  # the metrics tests run `promtool check metrics` on a live router; promtool comes with Debian's
  # prometheus package, whose server is not wanted: no recommends (node exporter), and the service the
  # package enables and starts is stopped and disabled again (in a container without systemd it never starts)
  echo "==> installing promtool (metrics tests)"
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
  if [[ -d /run/systemd/system ]]; then
    $sudo systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  else
    $sudo invoke-rc.d prometheus stop >/dev/null 2>&1 || true
  fi
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)${extras}"
if [[ ! -f "$stamp" ]]; then
  echo "==> installing vllm-model-router${extras} into .venv"
  .venv/bin/python -m pip install -q -e ".${extras}"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
