#!/usr/bin/env bash
# The main demo: installs everything, starts the real local model, runs the nightly support-triage DAG
# end to end with `airflow dags test`, prints what it produced, and stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
source scripts/airflow-env.sh
DAG_ID="${1:-support_triage}"
LOGICAL_DATE="${2:-$(date -u +%Y-%m-%d)}"

airflow db migrate > "$AIRFLOW_HOME/db-migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
state_dir="$AIRFLOW_HOME/governed_ai/local_model"
echo "demo: starting the local model (SmolLM2-135M-Instruct on llama-cpp-python)"
governed-ai-local-model start --state-dir "$state_dir"
trap 'governed-ai-local-model stop --state-dir "$state_dir" >/dev/null' EXIT
eval "$(governed-ai-local-model env --state-dir "$state_dir")"

log="$AIRFLOW_HOME/demo-$DAG_ID.log"
echo "demo: airflow dags test $DAG_ID $LOGICAL_DATE (full log: $log)"
started=$(date +%s)
if ! airflow dags test "$DAG_ID" "$LOGICAL_DATE" > "$log" 2>&1; then
  tail -40 "$log"
  echo "demo: the DAG run failed; full log in $log" >&2
  exit 1
fi
echo "demo: DAG run finished in $(( $(date +%s) - started )) s. Task log lines of interest:"
grep -oE "model=[^ ]+ tokens=.* attempts=[0-9]+|wrote [0-9]+ results.*|T-[0-9]{4}: .*" "$log" | cut -c1-200
