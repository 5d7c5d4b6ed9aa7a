#!/usr/bin/env bash
# Creates .venv and installs the pinned lock (the model and embedding packages included) and this provider
# (editable).
# Idempotent: skips the install when nothing it depends on changed. The only compiled dependency,
# llama-cpp-python, builds from source on first use (~5 min on 2 cores) and is cached by uv afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GOVERNED_AI_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
UV_VERSION="0.13.9"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: Python 3.11+ is required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
[ -x "$VENV/bin/uv" ] || "$VENV/bin/python" -m pip install --quiet "uv==$UV_VERSION"

stamp="$VENV/.governed-ai-installed"
want="$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "bootstrap: installing pinned dependencies into $VENV (first run compiles llama-cpp-python, ~5 min)"
# The native build enables an AMX code path that crashes on the first completion on some CPUs.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
uv=("$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python")
"${uv[@]}" -r requirements/lock.txt
# A leftover *.egg-info registers the provider's entry point twice ("already registered"); the editable
# install's metadata lives in the venv, so the build's egg-info is removed afterwards too.
rm -rf ./*.egg-info
"${uv[@]}" --no-deps -e .
rm -rf ./*.egg-info
echo "$want" > "$stamp"
