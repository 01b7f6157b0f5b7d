#!/usr/bin/env bash
# Prepare (or reuse) a virtual environment with the LiteLLM proxy, used by the
# end-to-end tests as a real client in front of the router.
#
#   LITELLM_VENV   where the venv lives (default: ~/.cache/vllm-model-router/venv-litellm)
#   PYTHON3        interpreter used to create it (default: python3)
#   SETUP_FORCE=1  rebuild even when the venv looks ready
set -euo pipefail

LITELLM_VERSION="1.108.7"
RECIPE="litellm[proxy]==${LITELLM_VERSION};recipe=1"

VENV="${LITELLM_VENV:-$HOME/.cache/vllm-model-router/venv-litellm}"
PY3="${PYTHON3:-python3}"
MARKER="$VENV/.vllm-model-router-ready"
start=$(date +%s)

log() { printf '[setup_litellm] %s\n' "$*" >&2; }

# One build at a time (CI runs in several clones may share the venv).
mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null; then
    exec 9>"$VENV.lock"
    flock 9
fi

# LiteLLM fetches a model cost map (and more) from the internet at import; keep it local.
export LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOCAL_POLICY_TEMPLATES=True \
    LITELLM_LOCAL_BLOG_POSTS=True LITELLM_LOCAL_AUTOROUTER_PRESETS=True \
    LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS=True LITELLM_DONT_SHOW_FEEDBACK_BOX=True

venv_ok() {
    [[ -x "$VENV/bin/litellm" ]] || return 1
    [[ -f "$MARKER" && "$(cat "$MARKER")" == "$RECIPE" ]] || return 1
    # Cheap check (importing the proxy takes ~10 s): the distribution is there at the pinned version.
    "$VENV/bin/python" -c "import importlib.metadata as m, importlib.util as u, sys
sys.exit(0 if m.version('litellm') == '${LITELLM_VERSION}' and u.find_spec('litellm') else 1)" \
        >/dev/null 2>&1
}

if [[ "${SETUP_FORCE:-0}" != "1" ]] && venv_ok; then
    log "reusing $VENV ($(cat "$MARKER")); checked in $(( $(date +%s) - start )) s"
    exit 0
fi

if ! "$PY3" -c 'import venv, ensurepip' >/dev/null 2>&1 && command -v apt-get >/dev/null; then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
fi

log "building $VENV with $PY3"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY3" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
t0=$(date +%s)
"${PIP[@]}" install -q "litellm[proxy]==${LITELLM_VERSION}"
log "pip install took $(( $(date +%s) - t0 )) s"

"$VENV/bin/python" -c 'import importlib.metadata as m, litellm.proxy.proxy_server; print("  litellm==" + m.version("litellm"))'
printf '%s' "$RECIPE" >"$MARKER"
log "ready: $VENV in $(( $(date +%s) - start )) s"
