#!/usr/bin/env bash
# Builds the sdist and the wheel into OUT_DIR (default dist/) from a clean copy of the files they are made
# of, so that setuptools leaves no *.egg-info or build/ behind in the checkout (a stray egg-info makes the
# editable install register the provider's entry points twice).
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-dist}")"
UV="${UV:-$PWD/.venv/bin/uv}"
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
cp -r pyproject.toml README.md LICENSE NOTICE MANIFEST.in governed_ai "$src"/
find "$src" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$out"
"$UV" build --quiet --out-dir "$out" "$src" >/dev/null
ls "$out"
