#!/usr/bin/env bash
# The compatibility suite: builds the wheel from this checkout, installs it (not editable) into a fresh venv
# per Airflow line from that line's pinned lock (requirements/compat-<line>.lock), and runs tests/compat
# there: `airflow providers list`, the example DAGs parsed, the plugin and connection forms loaded, every
# operator through dag.test() against the fake model server.
#
#   scripts/compat.sh            # the lines in COMPAT_LINES below (3.1 with every floor, 3.2)
#   scripts/compat.sh 3.2        # one line
#
# Venvs live in .compat/venv-<line>; a venv whose lock did not change is reused (uv installs from its cache,
# so a fresh one takes seconds). Called by scripts/test.sh; needs the uv that scripts/bootstrap.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPAT_LINES=(3.1 3.2)
lines=("$@")
[ ${#lines[@]} -gt 0 ] || lines=("${COMPAT_LINES[@]}")
UV="${UV:-$PWD/.venv/bin/uv}"
PYTHON="${PYTHON:-python3}"
work="$PWD/.compat"
mkdir -p "$work"

started=$SECONDS
UV="$UV" scripts/build-dist.sh "$work/dist" >/dev/null
wheel="$(ls "$work"/dist/airflow_provider_governed_ai-*.whl)"
echo "compat: built $(basename "$wheel") in $((SECONDS - started)) s"

status=0
for line in "${lines[@]}"; do
  line_started=$SECONDS
  lock="requirements/compat-$line.lock"
  [ -f "$lock" ] || { echo "compat: no lock file $lock" >&2; exit 2; }
  venv="$work/venv-$line"
  stamp="$venv/.compat-lock"
  want="$(sha256sum "$lock" | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -rf "$venv"
    "$UV" venv --quiet --python "$PYTHON" "$venv"
    "$UV" pip install --quiet --python "$venv/bin/python" -r "$lock"
    echo "$want" > "$stamp"
  fi
  # The wheel with its extras, resolved against the lock as constraints: a declared floor above a pinned
  # version, or a dependency the lock lacks, fails here instead of being papered over.
  "$UV" pip install --quiet --python "$venv/bin/python" --reinstall-package airflow-provider-governed-ai \
    -c "$lock" "$wheel[chroma,validation]"
  "$UV" pip check --python "$venv/bin/python" >/dev/null
  echo "compat: Airflow $line venv ready in $((SECONDS - line_started)) s"
  # --confcutdir: only tests/compat's conftest applies; --import-mode=append and the venv's own pytest
  # script (not `python -m`, which puts the checkout first on sys.path): the installed wheel is imported.
  if ! GOVERNED_AI_COMPAT_AIRFLOW="$line" GOVERNED_AI_EXAMPLE_DAGS="$PWD/example_dags" \
      GOVERNED_AI_COMPAT_WHEEL="$wheel" UV="$UV" \
      "$venv/bin/pytest" tests/compat --confcutdir=tests/compat --import-mode=append \
      -p no:cacheprovider -q -m compat; then
    status=1
  fi
  echo "compat: Airflow $line done in $((SECONDS - line_started)) s"
done
echo "compat: ${#lines[@]} line(s) in $((SECONDS - started)) s"
exit $status
