#!/usr/bin/env bash
# A multi-worker Airflow on this machine, with the provider: the "try it multi-worker" recipe.
#
#   scripts/multi-worker.sh start            # start everything (or whatever is not running)
#   scripts/multi-worker.sh status           # what runs, where; the UI URL and the admin password
#   eval "$(scripts/multi-worker.sh env)"    # this shell talks to the cluster (airflow, governed-ai CLIs)
#   scripts/multi-worker.sh kill-worker a    # SIGKILL worker a and its tasks, as if its machine died
#   scripts/multi-worker.sh stop             # stop everything, leave no process behind (data is kept)
#   scripts/multi-worker.sh purge            # stop, then delete the cluster's directory
#
# What `start` runs, all on 127.0.0.1 on free ports chosen at run time, all from Debian and PyPI packages
# (nothing by hand), with every file under one directory ($MULTI_WORKER_HOME, default .multi-worker/):
#
#   PostgreSQL   Airflow's metadata database AND the provider's governance store (audit trail, budget
#                ledger, replay journal): the Debian `postgresql` server binaries, a cluster of its own
#   Redis        the Celery broker (Debian `redis-server`, installed when missing and we are root)
#   Chroma       the vector store every worker shares (`chroma run`)
#   Airflow      scheduler, dag-processor, api-server, triggerer, and two Celery workers, `worker-a` and
#                `worker-b` (`airflow celery worker`, 2 task slots each). Both serve the `default` queue;
#                each also serves its own (`worker_a`, `worker_b`), so a task can be pinned to one.
#   A model      the real local model (governed-ai-local-model), unless AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT
#                is already set, e.g. to OpenAI or another OpenAI-compatible server
#
# Everything a process needs is in the environment, written once to $MULTI_WORKER_HOME/cluster.env and
# given to every component (restarting one component reuses it). That file is the answer to "what must
# every worker share" (docs/deployment.md): one store_url, one Chroma, one policy, one LLM connection.
# Settings for every Airflow process can be given at the first `start`: any AIRFLOW__* / AIRFLOW_CONN_*
# variable in the environment then is kept, and so are these:
#   MULTI_WORKER_HOME        the cluster's directory (default: .multi-worker in the checkout)
#   MULTI_WORKER_POLICY      the governance policy file (default: a copy of the example policy, which you
#                            can edit: workers re-read it within [governed_ai] policy_check_interval_seconds)
#   MULTI_WORKER_EXTRA_DAGS  a second DAGs folder, next to example_dags/ (a second DAG bundle)
#
# Not for production as it is: PostgreSQL runs with fsync off and trust authentication on 127.0.0.1, and
# the scheduler gives up on a silent task after 60 s (default 300) so that a dead worker's tasks are
# retried quickly. Airflow parallelism and task slots are kept low for a 2-core machine.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
H="$(mkdir -p "${MULTI_WORKER_HOME:-$REPO/.multi-worker}" && cd "${MULTI_WORKER_HOME:-$REPO/.multi-worker}" && pwd)"
RUN="$H/run" LOGS="$H/logs"
ENV_FILE="$H/cluster.env"
VENV="${GOVERNED_AI_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
WORKERS=(a b)
WORKER_SLOTS=2
AIRFLOW_COMPONENTS=(scheduler dag-processor triggerer api-server worker-a worker-b)
LAUNCHED=()  # components this invocation started (watched while waiting)

say() { echo "multi-worker: $*"; }
die() { echo "multi-worker: $*" >&2; exit 1; }

# -- processes: each component runs in a session of its own, its pid in $RUN/NAME.pid ------------------
pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
running() { alive "$(pid_of "$1")"; }

# A process and all its descendants. Airflow's task supervisor puts each task in a process group of its
# own, so a component's process group is not enough: walk the tree.
tree() {
  local pid=$1 child
  echo "$pid"
  for child in $(pgrep -P "$pid" || true); do tree "$child"; done
}

launch() {  # launch NAME COMMAND...: start COMMAND in a new session, output appended to $LOGS/NAME.log
  local name=$1
  shift
  if running "$name"; then
    say "$name already runs (pid $(pid_of "$name"))"
    return 0
  fi
  echo "=== $(date -u +%FT%TZ) start: $*" >> "$LOGS/$name.log"
  setsid "$@" >> "$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
  LAUNCHED+=("$name")
}

halt() {  # halt NAME [GRACE_SECONDS]: SIGTERM, then SIGKILL whatever is left of its process tree
  local name=$1 grace=${2:-30} pid pids waited=0 began=$SECONDS
  pid="$(pid_of "$name")"
  if ! alive "$pid"; then
    rm -f "$RUN/$name.pid"
    return 0
  fi
  pids="$(tree "$pid")"
  kill -TERM "$pid" 2>/dev/null || true
  while alive "$pid" && [ "$waited" -lt "$((grace * 5))" ]; do
    sleep 0.2
    waited=$((waited + 1))
  done
  pids="$pids $(alive "$pid" && tree "$pid" || true)"
  # shellcheck disable=SC2086  # word splitting intended: a list of pids
  kill -KILL $pids 2>/dev/null || true
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$RUN/$name.pid"
  say "stopped $name ($((SECONDS - began)) s)"
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...: until COMMAND succeeds; fails fast if a component died
  local what=$1 seconds=$2 name
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    for name in "${LAUNCHED[@]}"; do
      if ! running "$name"; then
        tail -15 "$LOGS/$name.log" >&2
        die "$name exited while waiting for $what (log: $LOGS/$name.log)"
      fi
    done
    [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up within $seconds s (logs: $LOGS)"
    sleep 0.5
  done
}

# -- prerequisites ----------------------------------------------------------------------------------------
need_debian_package() {  # need_debian_package PACKAGE CHECK...: apt-get install PACKAGE when CHECK fails
  local package=$1
  shift
  "$@" >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] || die "the Debian package $package is missing: sudo apt-get install $package"
  say "installing the Debian package $package"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_pg() {  # PostgreSQL refuses to run as root: then run its binaries as the `postgres` OS user
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

prerequisites() {
  [ -x "$PY" ] || "$REPO/scripts/bootstrap.sh"
  "$PY" -c "import airflow.providers.celery, redis" 2>/dev/null || "$REPO/scripts/bootstrap.sh"
  need_debian_package postgresql test -x "$(pg_bin)/initdb"
  need_debian_package redis-server command -v redis-server
}

# -- the cluster's environment: chosen at the first start, reused by every later (re)start -------------
free_ports() {
  "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

postgres_dir() {
  # The postgres OS user must reach its data directory; a checkout under a private home (e.g. /root)
  # is out of its reach, so the cluster then lives in a temporary directory (recorded in cluster.env).
  if [ "$(id -u)" != 0 ] || runuser -u postgres -- test -x "$H"; then
    echo "$H/postgres"
  else
    mktemp -d "${TMPDIR:-/tmp}/governed-ai-multi-worker-pg.XXXXXX"
  fi
}

write_env() {
  local pg redis chroma api triggerer_logs ports
  read -r pg redis chroma api triggerer_logs <<< "$(free_ports 5)"
  local secrets
  secrets="$("$PY" -c 'import secrets; from cryptography.fernet import Fernet; print(secrets.token_urlsafe(32), Fernet.generate_key().decode(), secrets.token_urlsafe(12))')"
  local jwt_secret fernet_key password
  read -r jwt_secret fernet_key password <<< "$secrets"
  local policy="${MULTI_WORKER_POLICY:-}"
  if [ -z "$policy" ]; then
    policy="$H/governance_policy.yaml"
    [ -f "$policy" ] || cp "$REPO/example_dags/policies/governance_policy.yaml" "$policy"
  fi
  local bundles="{\"name\": \"governed_ai_examples\", \"classpath\": \"airflow.dag_processing.bundles.local.LocalDagBundle\", \"kwargs\": {\"path\": \"$REPO/example_dags\"}}"
  if [ -n "${MULTI_WORKER_EXTRA_DAGS:-}" ]; then
    bundles="$bundles, {\"name\": \"extra_dags\", \"classpath\": \"airflow.dag_processing.bundles.local.LocalDagBundle\", \"kwargs\": {\"path\": \"$(cd "$MULTI_WORKER_EXTRA_DAGS" && pwd)\"}}"
  fi
  [ -f "$H/postgres.location" ] || postgres_dir > "$H/postgres.location"
  echo "{\"admin\": \"$password\"}" > "$H/passwords.json"
  {
    echo "# Written by scripts/multi-worker.sh start; every component of the cluster runs with it."
    # Whatever Airflow settings and connections the caller gave at the first start.
    { env | grep -E '^AIRFLOW(__[A-Z0-9_]+__[A-Z0-9_]+|_CONN_[A-Z0-9_]+)=' || true; } | while IFS='=' read -r key value; do
      printf 'export %s=%q\n' "$key" "$value"
    done
    cat <<EOF
export MULTI_WORKER_HOME=$(printf %q "$H")
export PATH=$(printf %q "$VENV/bin"):\$PATH
export AIRFLOW_HOME=$(printf %q "$H/airflow")
export MULTI_WORKER_PG_DIR=$(printf %q "$(cat "$H/postgres.location")")
export MULTI_WORKER_PG_PORT=$pg MULTI_WORKER_REDIS_PORT=$redis MULTI_WORKER_CHROMA_PORT=$chroma
export MULTI_WORKER_API_URL=http://127.0.0.1:$api
export MULTI_WORKER_LOCAL_MODEL=$([ -n "${AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT:-}" ] && echo 0 || echo 1)
# One PostgreSQL for Airflow's metadata (psycopg 3, sync and async) and the governance store.
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg://postgres@127.0.0.1:$pg/airflow
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=postgresql+psycopg://postgres@127.0.0.1:$pg/airflow
export AIRFLOW__GOVERNED_AI__STORE_URL=postgresql+psycopg://postgres@127.0.0.1:$pg/governance
export AIRFLOW__GOVERNED_AI__POLICY_PATH=$(printf %q "$policy")
export AIRFLOW_CONN_GOVERNED_AI_CHROMA_DEFAULT='{"conn_type": "governed_ai_chroma", "host": "127.0.0.1", "port": $chroma}'
# CeleryExecutor: Redis as the broker and for task results.
export AIRFLOW__CORE__EXECUTOR=CeleryExecutor
export AIRFLOW__CELERY__BROKER_URL=redis://127.0.0.1:$redis/0
export AIRFLOW__CELERY__RESULT_BACKEND=redis://127.0.0.1:$redis/1
export AIRFLOW__CELERY__WORKER_CONCURRENCY=$WORKER_SLOTS
export AIRFLOW__CELERY__SYNC_PARALLELISM=1
# Small on purpose (2 cores): 4 tasks at once (2 workers x 2 slots), one API worker, one parser.
export AIRFLOW__CORE__PARALLELISM=4
export AIRFLOW__API__WORKERS=1
export AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES=1
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=5
export AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST=$(printf %q "[$bundles]")
export AIRFLOW__CORE__LOAD_EXAMPLES=False
# A task whose worker died is failed (and retried) after 60 s of silence instead of 300.
export AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=60
export AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL=5
# The API: where the UI is, where task supervisors report, and the secrets every process must share.
export AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=$api AIRFLOW__API__BASE_URL=http://127.0.0.1:$api
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$api/execution/
export AIRFLOW__API_AUTH__JWT_SECRET=$jwt_secret
export AIRFLOW__CORE__FERNET_KEY=$fernet_key
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=admin:admin
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=$(printf %q "$H/passwords.json")
export AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=$triggerer_logs
EOF
  } > "$ENV_FILE"
}

load_env() {
  # shellcheck disable=SC1090
  source "$ENV_FILE"
}

# -- services -----------------------------------------------------------------------------------------
start_postgres() {
  local bin data
  bin="$(pg_bin)"
  data="$MULTI_WORKER_PG_DIR/data"
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$MULTI_WORKER_PG_DIR"
    [ "$(id -u)" != 0 ] || chown postgres:postgres "$MULTI_WORKER_PG_DIR"
    as_pg "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C --no-sync > "$LOGS/initdb.log"
  fi
  if ! as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$data" -l "$MULTI_WORKER_PG_DIR/server.log" -w -t 60 start -o \
      "-c listen_addresses=127.0.0.1 -p $MULTI_WORKER_PG_PORT -k $MULTI_WORKER_PG_DIR -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
      > /dev/null
  fi
  local db
  for db in airflow governance; do
    if [ -z "$("$bin/psql" -h 127.0.0.1 -p "$MULTI_WORKER_PG_PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
      "$bin/psql" -h 127.0.0.1 -p "$MULTI_WORKER_PG_PORT" -U postgres -qc "CREATE DATABASE $db"
    fi
  done
}

stop_postgres() {
  local data="${MULTI_WORKER_PG_DIR:-}/data"
  if [ -f "$data/postmaster.pid" ]; then
    as_pg "$(pg_bin)/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    say "stopped postgres"
  fi
}

redis_ready() { "$PY" -c "import redis; redis.Redis(port=$MULTI_WORKER_REDIS_PORT).ping()"; }
chroma_ready() { curl -fsS "http://127.0.0.1:$MULTI_WORKER_CHROMA_PORT/api/v2/heartbeat"; }

start_services() {
  start_postgres
  mkdir -p "$H/redis" "$H/chroma"
  launch redis redis-server --bind 127.0.0.1 --port "$MULTI_WORKER_REDIS_PORT" --dir "$H/redis" \
    --save '' --appendonly no --daemonize no
  launch chroma chroma run --path "$H/chroma" --host 127.0.0.1 --port "$MULTI_WORKER_CHROMA_PORT"
  if [ "${MULTI_WORKER_LOCAL_MODEL:-0}" = 1 ] && ! governed-ai-local-model status --state-dir "$H/local_model" >/dev/null 2>&1; then
    # No model was given: the real local model. It gets a free port at each start, so the connection
    # in cluster.env is rewritten (a component still running with the old one must be restarted).
    governed-ai-local-model start --state-dir "$H/local_model" >/dev/null
    sed -i '/^export AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT=/d' "$ENV_FILE"
    governed-ai-local-model env --state-dir "$H/local_model" >> "$ENV_FILE"
    load_env
  fi
  wait_for redis 30 redis_ready
  wait_for chroma 60 chroma_ready
}

# -- Airflow --------------------------------------------------------------------------------------------
api_healthy() {
  curl -fsS "$MULTI_WORKER_API_URL/api/v2/monitor/health" | "$PY" -c '
import json, sys
health = json.load(sys.stdin)
sys.exit(any(health.get(c, {}).get("status") != "healthy" for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")))'
}

worker_ready() {  # the Celery banner "worker-X@host ready." after its latest start
  awk '/^=== .* start:/ {ready = 0} /worker-'"$1"'@.* ready\./ {ready = 1} END {exit !ready}' "$LOGS/worker-$1.log"
}

start_airflow() {
  mkdir -p "$AIRFLOW_HOME"
  if ! running scheduler && ! running api-server; then
    say "airflow db migrate (log: $LOGS/db-migrate.log)"
    airflow db migrate >> "$LOGS/db-migrate.log" 2>&1 || { tail -20 "$LOGS/db-migrate.log"; die "airflow db migrate failed"; }
  fi
  launch scheduler airflow scheduler
  launch dag-processor airflow dag-processor
  launch triggerer airflow triggerer
  launch api-server airflow api-server --host 127.0.0.1 --port "${AIRFLOW__API__PORT}" --workers 1
  local worker
  for worker in "${WORKERS[@]}"; do
    # Task logs go to the shared $AIRFLOW_HOME/logs, which the api-server reads: no log server needed on
    # one machine (on several, serve them or use remote logging).
    launch "worker-$worker" airflow celery worker --celery-hostname "worker-$worker@%h" \
      --queues "default,worker_$worker" --concurrency "$WORKER_SLOTS" --skip-serve-logs
  done
  wait_for "the api-server and scheduler" 240 api_healthy
  for worker in "${WORKERS[@]}"; do wait_for "worker-$worker" 180 worker_ready "$worker"; done
}

# -- commands -----------------------------------------------------------------------------------------
cmd_start() {
  prerequisites
  mkdir -p "$RUN" "$LOGS"
  local any=0 component
  for component in "${AIRFLOW_COMPONENTS[@]}" redis chroma; do running "$component" && any=1; done
  if [ "$any" = 0 ] || [ ! -f "$ENV_FILE" ]; then
    write_env  # nothing runs: free ports and settings are chosen now
  fi
  load_env
  local started=$SECONDS
  start_services
  start_airflow
  say "started in $((SECONDS - started)) s"
  cmd_status
}

cmd_stop() {
  [ -f "$ENV_FILE" ] || { say "nothing to stop in $H"; return 0; }
  load_env
  # Nothing new is scheduled, then the workers finish (or lose) their tasks, then the rest; each group
  # in parallel.
  halt scheduler & halt triggerer & halt dag-processor & wait
  local worker
  for worker in "${WORKERS[@]}"; do halt "worker-$worker" 20 & done
  wait
  halt api-server
  if [ "${MULTI_WORKER_LOCAL_MODEL:-0}" = 1 ]; then
    governed-ai-local-model stop --state-dir "$H/local_model" >/dev/null || true
  fi
  halt chroma 10 & halt redis 10 & wait
  stop_postgres
}

cmd_status() {
  [ -f "$ENV_FILE" ] || { say "not started ($H)"; return 3; }
  load_env
  local component state all=0
  for component in "${AIRFLOW_COMPONENTS[@]}" redis chroma; do
    if running "$component"; then state="running (pid $(pid_of "$component"))"; else state="stopped"; all=3; fi
    printf '  %-14s %s\n' "$component" "$state"
  done
  if as_pg "$(pg_bin)/pg_ctl" -D "$MULTI_WORKER_PG_DIR/data" status >/dev/null 2>&1; then state="running"; else state="stopped"; all=3; fi
  printf '  %-14s %s\n' postgres "$state (127.0.0.1:$MULTI_WORKER_PG_PORT, databases airflow and governance)"
  if [ "${MULTI_WORKER_LOCAL_MODEL:-0}" = 1 ]; then
    if governed-ai-local-model status --state-dir "$H/local_model" >/dev/null 2>&1; then state="running"; else state="stopped"; all=3; fi
    printf '  %-14s %s\n' local-model "$state (the governed_ai_llm_default connection)"
  fi
  echo "  UI and REST API: $MULTI_WORKER_API_URL (user admin, password in $H/passwords.json)"
  echo "  logs: $LOGS; environment: eval \"\$($0 env)\""
  return "$all"
}

cmd_kill_worker() {  # SIGKILL a worker and every process under it (its tasks too): a machine that died
  local name="worker-${1:?which worker: a or b}" pid
  pid="$(pid_of "$name")"
  alive "$pid" || die "$name is not running"
  # shellcheck disable=SC2046
  kill -KILL $(tree "$pid") 2>/dev/null || true
  rm -f "$RUN/$name.pid"
  say "killed $name (pid $pid) and its tasks; \`$0 start\` starts it again"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) [ -f "$ENV_FILE" ] || die "not started"; grep -v '^#' "$ENV_FILE" ;;
  kill-worker) cmd_kill_worker "${2:-}" ;;
  purge)
    cmd_stop
    [ ! -f "$H/postgres.location" ] || [ "$(cat "$H/postgres.location")" = "$H/postgres" ] || rm -rf "$(cat "$H/postgres.location")"
    rm -rf "$H"
    say "deleted $H"
    ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
