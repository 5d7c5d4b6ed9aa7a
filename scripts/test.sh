#!/usr/bin/env bash
# The test command: installs what the tests need (the same pinned venv as the demo, plus a PostgreSQL
# server binary for the governance store tests, Redis for the Celery cluster test, Chromium for the UI
# browser test), then lints, type-checks and runs the whole suite, including the tests against the real
# local model, real Chroma, real Great Expectations and Airflow, and then the compatibility suite: the
# built wheel on Airflow 3.1 and 3.2 in venvs of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "test: installing PostgreSQL (Debian package) for the governance store tests"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "test: PostgreSQL server binaries are missing; install them: sudo apt-get install postgresql" >&2
    exit 1
  fi
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "test: installing Redis (Debian package) for the multi-worker (Celery) test"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "test: redis-server is missing; install it: sudo apt-get install redis-server" >&2
    exit 1
  fi
fi
if ! command -v chromium >/dev/null 2>&1 || [ ! -x /usr/bin/chromedriver ]; then
  echo "test: installing Chromium and its driver (Debian packages) for the UI browser test"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "test: chromium/chromium-driver are missing; install them: sudo apt-get install chromium chromium-driver" >&2
    exit 1
  fi
fi
source scripts/airflow-env.sh
echo "test: ruff"
ruff check governed_ai tests example_dags benchmarks
echo "test: mypy"
mypy
echo "test: pytest (Airflow 3.3)"
status=0
python -m pytest "$@" || status=$?
# The built wheel in its own venvs with the newest Airflow 3.1 (every dependency at its floor) and 3.2.
echo "test: compatibility suite (scripts/compat.sh)"
scripts/compat.sh || status=$?
exit $status
