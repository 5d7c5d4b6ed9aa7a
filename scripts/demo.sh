#!/usr/bin/env bash
# The main demo: installs everything, starts the real local model, runs the example DAGs end to end with
# `airflow dags test` (the knowledge base, the flagship support triage, RAG answering, the order agent,
# budget-capped enrichment, the governance showcase, common-ai and plain openai calls), prints what they produced, and stops what it started.
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
local_model_cli="$PWD/.venv/bin/governed-ai-local-model"
trap '"$local_model_cli" stop --state-dir "$state_dir" >/dev/null' EXIT
eval "$(governed-ai-local-model env --state-dir "$state_dir")"
# common-ai's operators reach the governed model through this connection (it points at the LLM connection).
export AIRFLOW_CONN_GOVERNED_AI_PYDANTICAI_DEFAULT='{"conn_type": "governed_ai_pydanticai"}'

run_dag() {
  local dag_id="$1" log="$AIRFLOW_HOME/demo-$1.log" started
  echo
  echo "demo: airflow dags test $dag_id $LOGICAL_DATE (full log: $log)"
  started=$(date +%s)
  if ! airflow dags test "$dag_id" "$LOGICAL_DATE" > "$log" 2>&1 || ! grep "DagRun Finished" "$log" | grep -q "state=success"; then
    tail -40 "$log"
    echo "demo: the $dag_id run failed; full log in $log" >&2
    exit 1
  fi
  echo "demo: $dag_id finished in $(( $(date +%s) - started )) s. From its task logs:"
  grep -oE "model=[^ ]+ tokens=.* rule=[^ ]+|wrote [0-9]+ results.*|T-[0-9]{4}: .*|Ingested [0-9]+ chunks[^[]*|Purged [0-9]+ chunk\(s\) from [a-z_]+|Q[0-9]: .*|[0-9]+/[0-9]+ items done: [^[]*|enriched [0-9]+ products.*|stopped by the daily budget.{0,60}|[0-9]+ rows passed.*|denied by governance: .{0,160}|[a-z_]+: [a-z.]+ [^ ]+ (allow|deny) rule=[^ ]+ outcome=[a-z]+|audit chain: .*" "$log" \
    | grep -v '^denied by governance: {' | awk '!seen[$0]++' | cut -c1-220
}

if [ "$#" -ge 1 ]; then
  run_dag "$DAG_ID"
else
  run_dag kb_ingest            # the knowledge base the triage job's sensor waits for
  run_dag support_triage       # the flagship: retrieve, classify in one batch, quality gate, write
  run_dag kb_answering
  run_dag order_agent
  run_dag catalog_enrichment
  run_dag governance_showcase
  run_dag common_ai_governed   # a plain openai @task and common-ai's operators, governed
fi
echo
echo "demo: governed-ai audit verify / budget status"
governed-ai audit verify | tr -d '\n' | cut -c1-200; echo
governed-ai budget status
echo "demo: done; stopping the local model"
