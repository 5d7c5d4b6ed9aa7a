# Sourced by the demo and test scripts: a project-local Airflow home, so nothing touches ~/airflow.
export AIRFLOW_HOME="${GOVERNED_AI_AIRFLOW_HOME:-$PWD/.airflow-home}"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/example_dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM=4
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p "$AIRFLOW_HOME"
