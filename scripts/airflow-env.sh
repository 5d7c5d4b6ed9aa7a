# Sourced by the demo and test scripts: a project-local Airflow home, so nothing touches ~/airflow.
export AIRFLOW_HOME="${GOVERNED_AI_AIRFLOW_HOME:-$PWD/.airflow-home}"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/example_dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM=4
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p "$AIRFLOW_HOME"
# Governance: the example policy, and the audit trail / budget ledger in a SQLite file under AIRFLOW_HOME.
export AIRFLOW__GOVERNED_AI__POLICY_PATH="${AIRFLOW__GOVERNED_AI__POLICY_PATH:-$PWD/example_dags/policies/governance_policy.yaml}"
