"""The provider on a real multi-worker Airflow: CeleryExecutor, two workers, PostgreSQL, a Chroma server.

One cluster for the whole module, started and stopped with ``scripts/multi-worker.sh`` (the recipe users
read): PostgreSQL (Airflow metadata and governance store), Redis (broker), a Chroma server, scheduler,
dag-processor, api-server, triggerer and two Celery workers with 2 task slots each. The model is the
fault-injecting fake server (its own process, 5% of requests answered 429 or 500), which counts what it
served per item key: that is what "paid twice" and "the ledger equals what was served" are checked
against. Everything goes through the REST API, as a user's client would:

a. the flagship jobs (kb_ingest, support_triage, order_agent, catalog_enrichment): results, the audit
   chain (``governed-ai audit verify``), the budget ledger and the UI plugin's JSON API;
b. a 2,000-item ``LLMBatchOperator`` whose worker is SIGKILLed mid-batch: Airflow's retry runs on the
   other worker, replays the journal, and at most ``concurrency`` items are paid twice; the ledger equals
   what the server served;
c. a grant revoked while batches run on both workers: the next calls on both are denied;
d. two DAGs on different workers racing for one budget: never over it, and at least 95% of it used.

Test DAGs for b-d live in ``tests/production/celery_dags/`` (a second DAG bundle of the cluster).
Timings of each phase are printed at the end of the session.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from sqlalchemy import Engine

from governed_ai.local_model import NOMINAL_PRICE
from tests.fakes.fault_server import FaultConfig, FaultServerProcess
from tests.production.celery_cluster import REPO, Cluster, clean_environment, wait_until

# The cluster starts inside the first test's time; each scenario takes minutes on 2 cores.
pytestmark = [pytest.mark.multi_worker, pytest.mark.timeout(900)]

FLAGSHIPS = ["kb_ingest", "support_triage", "order_agent", "catalog_enrichment"]
TEST_DAGS = ["mw_kill_batch", "mw_revoke", "mw_budget_a", "mw_budget_b"]
CLUSTER_HOME = REPO / ".multi-worker-test"
POLICY_CHECK_INTERVAL_S = 5.0  # the provider's default: workers re-read a changed policy this often
KILL_BATCH_ITEMS = 2000
KILL_BATCH_CONCURRENCY = 4  # as in celery_dags/mw_kill_batch.py
KILL_AFTER_SERVED = 500
REVOKE_CONCURRENCY = 2  # as in celery_dags/mw_revoke.py
RACE_BUDGET_TOKENS = 6000
SERVER = FaultConfig(
    latency_ms=20, fault_rate=0.05, seed=19, kinds=("429", "500"), retry_after_s=0.05, models=("smollm2",)
)

TEST_RULES = [
    {
        "name": "mw-batches",
        "description": "The multi-worker test's kill and budget-race DAGs.",
        "match": {"dag_id": ["mw_kill_batch", "mw_budget_*"]},
        "models": [{"connection": "governed_ai_llm_default", "model": "smollm2", "max_tokens_per_call": 64}],
    },
    {
        "name": "mw-revoke",
        "description": "The grant the multi-worker test revokes while its batches run.",
        "match": {"dag_id": "mw_revoke"},
        "models": [{"connection": "governed_ai_llm_default", "model": "smollm2", "max_tokens_per_call": 64}],
    },
]
TEST_BUDGETS = [
    {
        "name": "mw-kill-run",
        "scope": "dag",
        "match": {"dag_id": "mw_kill_batch"},
        "period": "run",
        "max_tokens": 1_000_000,
    },
    {
        "name": "mw-race",
        "scope": "dag",
        "match": {"dag_id": "mw_budget_*"},
        "period": "day",
        "max_tokens": RACE_BUDGET_TOKENS,
    },
]


def policy_document(*, revoked: bool = False) -> str:
    """The example policy plus the test DAGs' rules and budgets (without the ``mw-revoke`` grant if
    ``revoked``)."""
    document = yaml.safe_load((REPO / "example_dags/policies/governance_policy.yaml").read_text())
    document["rules"] += [r for r in TEST_RULES if not (revoked and r["name"] == "mw-revoke")]
    document["budgets"] += TEST_BUDGETS
    return yaml.safe_dump(document, sort_keys=False)


def write_policy(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)  # workers never read half a policy


@dataclass
class Session:
    cluster: Cluster
    server: FaultServerProcess
    policy: Path
    timings: dict[str, float]
    observed: dict[str, str]

    def store(self) -> Engine:
        from governed_ai.core.sqlstore import create_store_engine

        return create_store_engine(self.cluster.store_url)


@pytest.fixture(scope="session")
def cluster_session(pytestconfig: pytest.Config) -> Iterator[Session]:
    timings: dict[str, float] = {}
    observed: dict[str, str] = {}
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    server = FaultServerProcess(SERVER).start()
    caller_env = clean_environment()
    cluster = Cluster(CLUSTER_HOME, caller_env)
    policy = CLUSTER_HOME.with_name(CLUSTER_HOME.name + "-policy.yaml")
    started = time.monotonic()
    try:
        cluster.script("purge")  # whatever a crashed earlier session left
        write_policy(policy, policy_document())
        caller_env.update(
            {
                "MULTI_WORKER_POLICY": str(policy),
                "MULTI_WORKER_EXTRA_DAGS": str(REPO / "tests/production/celery_dags"),
                # 5% of requests fail: with 2 retries, three failures in a row hit one of ~2,400 requests
                # about once in four runs; 4 retries make it about one in 1,300 runs.
                "AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT": server.connection_json(
                    # Priced like the local model: the support budgets limit cost (unpriced is refused).
                    default_model="smollm2",
                    timeout=10,
                    max_retries=4,
                    prices={"smollm2": NOMINAL_PRICE},
                ),
                # Only the runs the test triggers: unpausing a @daily example must not add a scheduled run.
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            }
        )
        cluster.start()
        timings["cluster start"] = time.monotonic() - started
        yield Session(cluster, server, policy, timings, observed)
    finally:
        stopping = time.monotonic()
        leftovers: list[int] = []
        try:
            pids = cluster.component_trees() if (CLUSTER_HOME / "run").exists() else []
            cluster.script("stop")
            leftovers = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
            cluster.script("purge")
        finally:
            server.stop()
            policy.unlink(missing_ok=True)
        timings["cluster stop"] = time.monotonic() - stopping
        timings["total"] = time.monotonic() - started
        lines = ["multi-worker timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())]
        lines += [f"multi-worker observed: {k}: {v}" for k, v in observed.items()]
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                for line in lines:
                    reporter.write_line(line)
        assert not leftovers, f"processes left after multi-worker.sh stop: {leftovers}"


def ledger_status(engine: Engine, budget: str, period: str | None = None) -> Any:
    from governed_ai.core.ledger import BudgetLedger

    rows = [s for s in BudgetLedger(engine).status() if s.budget == budget]
    if period is not None:
        rows = [s for s in rows if s.period == period]
    assert len(rows) == 1, f"expected one {budget} period, found {rows}"
    return rows[0]


def served(stats: dict[str, Any], prefix: str) -> tuple[dict[str, int], int]:
    """(successes per item key, tokens served) for the item keys starting with ``prefix``."""
    successes = {k: n for k, n in stats["successes"].items() if k.startswith(prefix)}
    tokens = sum(n for k, n in stats["tokens"].items() if k.startswith(prefix))
    return successes, tokens


# -- a. the flagship jobs -------------------------------------------------------------------------------


def test_flagship_jobs_run_on_the_celery_workers(cluster_session: Session) -> None:
    cluster, server = cluster_session.cluster, cluster_session.server
    began = time.monotonic()
    cluster.wait_for_dags(FLAGSHIPS + TEST_DAGS)
    server.reset_stats()
    runs = {dag_id: f"mw_{dag_id}_1" for dag_id in FLAGSHIPS}
    # The knowledge base first: support_triage's sensor waits for it.
    cluster.trigger("kb_ingest", runs["kb_ingest"])
    state = cluster.wait_for_run("kb_ingest", runs["kb_ingest"])
    assert state == "success", cluster.task_states("kb_ingest", runs["kb_ingest"])
    for dag_id in FLAGSHIPS[1:]:
        cluster.trigger(dag_id, runs[dag_id])
    for dag_id in FLAGSHIPS[1:]:
        state = cluster.wait_for_run(dag_id, runs[dag_id])
        assert state == "success", (dag_id, cluster.task_states(dag_id, runs[dag_id]))
    cluster_session.timings["a. flagships"] = time.monotonic() - began

    # Results, written by tasks on either worker.
    outputs = cluster.airflow_home / "governed_ai" / "outputs"
    triage = (outputs / "support_triage" / f"{runs['support_triage']}.jsonl").read_text().splitlines()
    tickets = (REPO / "example_dags/data/support_messages.jsonl").read_text().splitlines()
    quarantined = (outputs / "support_triage" / f"{runs['support_triage']}.quarantine.jsonl").read_text()
    assert len(triage) + len(quarantined.splitlines()) == len(tickets)
    assert triage and all(json.loads(line)["sentiment"] in ("negative", "positive") for line in triage)
    assert all(json.loads(line)["kb_article"] for line in triage)  # retrieval found an article
    enriched = (outputs / "catalog_enrichment" / "enriched.jsonl").read_text().splitlines()
    assert enriched and all(json.loads(line)["blurb"] for line in enriched)
    report = cluster.xcom("order_agent", runs["order_agent"], "audit_report")
    assert report["allowed_tool_calls"] >= 1 and report["denied_refunds"] >= 1 and report["chain_ok"]
    import chromadb

    chroma = chromadb.HttpClient(host="127.0.0.1", port=int(cluster.env["MULTI_WORKER_CHROMA_PORT"]))
    assert chroma.get_collection("kb_support").count() >= 5

    # Every task ran on a Celery worker, and both workers took part.
    ran_on = {w for w, d, r, _t, _n in cluster.executions() if (d, r) in runs.items()}
    assert ran_on == {"a", "b"}, cluster.executions()

    # The audit chain, checked with the CLI a user runs against the shared store.
    verify = subprocess.run(
        [str(REPO / ".venv/bin/governed-ai"), "audit", "verify"],
        env={**cluster.caller_env, **cluster.env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # The ledger: within limits, nothing left on hold, and every token the server served is in it.
    from governed_ai.core.audit import AuditStore
    from governed_ai.core.ledger import BudgetLedger

    engine = cluster_session.store()
    try:
        statuses = BudgetLedger(engine).status()
        assert {"support-daily", "enrichment-daily", "per-run-safety-net"} <= {s.budget for s in statuses}
        for status in statuses:
            assert status.max_tokens is None or status.spent_tokens <= status.max_tokens, status
            assert status.reserved_tokens == 0, status
        per_run = {s.period: s.spent_tokens for s in statuses if s.budget == "per-run-safety-net"}
        served_tokens = sum(server.stats()["tokens"].values())
        assert served_tokens > 0
        assert sum(per_run.get(run_id, 0) for run_id in runs.values()) == served_tokens
        calls = [
            r for r in AuditStore(engine).query(action="model.call", limit=None) if r.run_id in runs.values()
        ]
        assert sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in calls) == served_tokens
        support_daily = ledger_status(engine, "support-daily")
    finally:
        engine.dispose()

    # The UI plugin in the api-server reads what the workers wrote (token from POST /auth/token).
    assert cluster.status_of("/governed-ai/api/runs", auth=False) == 401
    page = cluster.request("GET", "/governed-ai/api/runs?dag_id=support_triage")
    (run,) = [r for r in page["runs"] if r["run_id"] == runs["support_triage"]]
    assert run["model_calls"] >= len(tickets) and run["total_tokens"] > 0
    budgets = cluster.request("GET", "/governed-ai/api/budgets?budget=support-daily")
    assert [b["spent_tokens"] for b in budgets] == [support_daily.spent_tokens]
    assert cluster.request("GET", "/governed-ai/api/verify?refresh=true")["ok"] is True
    denials = cluster.request("GET", "/governed-ai/api/records?dag_id=order_agent&decision=deny")
    assert any(r["resource"] == "issue_refund" for r in denials["records"])


# -- b. a worker killed mid-batch -----------------------------------------------------------------------


@dataclass
class KillOutcome:
    run_id: str
    killed_worker: str
    retry_workers: dict[int, str]
    served_before: set[str]
    journaled_before: set[str]
    state: str
    xcom: dict[str, Any]
    stats: dict[str, Any]


def journaled_keys(engine: Engine, item_prefix: str) -> set[str]:
    """Item keys of the completed model requests in the journal. The journal keeps digests only, so the
    key is read from the stored reply, in which the fault server echoes it."""
    from tests.reliability.support import journaled_keys as every_journaled_key

    return {key for key in every_journaled_key(engine) if key.startswith(item_prefix)}


@pytest.fixture(scope="module")
def killed_batch(cluster_session: Session) -> KillOutcome:
    cluster, server = cluster_session.cluster, cluster_session.server
    dag_id, task_id, run_id = "mw_kill_batch", "classify", "mw_kill_1"
    began = time.monotonic()
    server.reset_stats()
    cluster.trigger(dag_id, run_id)

    def running_and_paid() -> int | None:
        ti = cluster.task_instance(dag_id, run_id, task_id)
        if ti["state"] in ("success", "failed"):
            raise AssertionError(f"the batch ended before the kill: {ti['state']}")
        paid = len(served(server.stats(), "k-")[0])
        return ti["pid"] if ti["state"] == "running" and ti["pid"] and paid >= KILL_AFTER_SERVED else None

    task_pid = wait_until(running_and_paid, f"{KILL_AFTER_SERVED} items served", 300, poll_s=0.2)
    worker = cluster.worker_running(int(task_pid))
    assert worker is not None, f"task process {task_pid} is under no worker"
    cluster.script("kill-worker", worker)
    killed_at = time.monotonic()

    engine = cluster_session.store()
    try:
        # Requests the dead try still had at the server finish; then take stock of what was paid.
        wait_until(lambda: server.stats()["in_flight"] == 0, "the server to drain", 30, poll_s=0.1)
        served_before = set(served(server.stats(), "k-")[0])
        journaled_before = journaled_keys(engine, "k-")
        # Airflow notices the silent task (heartbeat timeout) and retries it; only the other worker is up.
        wait_until(
            lambda: (
                cluster.task_instance(dag_id, run_id, task_id)["try_number"] >= 2
                and cluster.task_instance(dag_id, run_id, task_id)["state"] == "running"
            ),
            "the retry to start",
            240,
        )
        cluster_session.timings["b. kill -> retry running"] = time.monotonic() - killed_at
        cluster.script("start")  # the killed worker comes back for the next scenarios
        state = cluster.wait_for_run(dag_id, run_id)
        xcom = cluster.xcom(dag_id, run_id, task_id) if state == "success" else {}
    finally:
        engine.dispose()
    cluster_session.timings["b. kill scenario"] = time.monotonic() - began
    return KillOutcome(
        run_id=run_id,
        killed_worker=worker,
        retry_workers=cluster.workers_of(dag_id, run_id, task_id),
        served_before=served_before,
        journaled_before=journaled_before,
        state=state,
        xcom=xcom,
        stats=server.stats(),
    )


def test_a_worker_killed_mid_batch_the_retry_on_the_other_worker_repeats_at_most_concurrency_items(
    cluster_session: Session, killed_batch: KillOutcome
) -> None:
    outcome = killed_batch
    assert outcome.state == "success"
    other = "b" if outcome.killed_worker == "a" else "a"
    assert outcome.retry_workers == {1: outcome.killed_worker, 2: other}
    # It really died mid-batch, with items completed and some in flight.
    assert 0 < len(outcome.journaled_before) < KILL_BATCH_ITEMS
    assert outcome.journaled_before <= outcome.served_before  # nothing journaled that was not served
    in_flight_at_kill = outcome.served_before - outcome.journaled_before
    assert len(in_flight_at_kill) <= KILL_BATCH_CONCURRENCY

    # The retry replayed what the killed try had journaled, and ran the rest.
    rows = [json.loads(line) for line in Path(outcome.xcom["results_path"]).read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"k-{i:04d}" for i in range(KILL_BATCH_ITEMS)]
    failed = [(r["key"], r.get("error")) for r in rows if r["status"] not in ("ok", "replayed")]
    assert not failed, f"items that did not succeed: {failed[:5]}"
    assert {r["key"] for r in rows if r["status"] == "replayed"} == outcome.journaled_before

    successes, _ = served(outcome.stats, "k-")
    assert set(successes) == {r["key"] for r in rows}
    repeated = {k for k, n in successes.items() if n > 1}
    cluster_session.observed["b. kill"] = (
        f"worker {outcome.killed_worker} killed after {len(outcome.journaled_before)} items journaled; "
        f"retried on {outcome.retry_workers.get(2)}; {len(repeated)} items paid twice"
    )
    assert max(successes.values()) <= 2
    assert repeated == in_flight_at_kill
    assert len(repeated) <= KILL_BATCH_CONCURRENCY


def test_after_a_kill_the_ledger_equals_what_the_server_served(
    cluster_session: Session, killed_batch: KillOutcome
) -> None:
    successes, served_tokens = served(killed_batch.stats, "k-")
    tokens = killed_batch.stats["tokens"]
    engine = cluster_session.store()
    try:
        from governed_ai.core.audit import AuditStore

        status = ledger_status(engine, "mw-kill-run", killed_batch.run_id)
        in_doubt = AuditStore(engine).query(
            action="model.call", dag_id="mw_kill_batch", run_id=killed_batch.run_id, limit=None
        )
    finally:
        engine.dispose()
    in_doubt = [r for r in in_doubt if r.outcome == "in_doubt"]
    # The calls the killed try left in flight are charged as paid by the retry (a provider bills what it
    # received), at what their repeat cost. Those the server had served before the kill it served twice
    # (the repeated items); the others (still in a back-off at the kill) are the only charge beyond what
    # the server served.
    repeated = {k for k, n in successes.items() if n > 1}
    in_doubt_tokens = sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in in_doubt)
    served_once_of_repeated = sum(tokens[k] // 2 for k in repeated)
    cluster_session.observed["b. ledger after the kill"] = (
        f"spent {status.spent_tokens}, held {status.reserved_tokens}; the server served {served_tokens}; "
        f"{len(in_doubt)} calls in doubt charged ({in_doubt_tokens} tokens), {len(repeated)} of them served"
    )
    assert status.reserved_tokens == 0  # the killed try's hold is settled, not left to expire
    assert len(repeated) <= len(in_doubt) <= KILL_BATCH_CONCURRENCY
    assert status.spent_tokens == served_tokens + in_doubt_tokens - served_once_of_repeated, (
        f"ledger {status.spent_tokens} tokens, server served {served_tokens}, in doubt {in_doubt_tokens}"
    )


# -- c. a grant revoked while batches run on both workers -----------------------------------------------


def test_a_revoked_grant_denies_the_next_calls_on_both_workers(cluster_session: Session) -> None:
    cluster, server = cluster_session.cluster, cluster_session.server
    dag_id, run_id = "mw_revoke", "mw_revoke_1"
    began = time.monotonic()
    server.reset_stats()
    cluster.trigger(dag_id, run_id)
    try:

        def both_running_and_calling() -> bool:
            states = cluster.task_states(dag_id, run_id)
            if any(s in ("success", "failed") for s in states.values()):
                raise AssertionError(f"a batch ended before the revocation: {states}")
            stats = server.stats()
            return all(
                states.get(f"on_{w}") == "running" and len(served(stats, f"r{w}-")[0]) >= 20 for w in "ab"
            )

        wait_until(both_running_and_calling, "both batches to be calling the model", 240, poll_s=0.5)
        workers = {task: w for w, d, r, task, _n in cluster.executions() if (d, r) == (dag_id, run_id)}
        assert workers == {"on_a": "a", "on_b": "b"}
        revoked_at = datetime.now(UTC)
        write_policy(cluster_session.policy, policy_document(revoked=True))
        time.sleep(POLICY_CHECK_INTERVAL_S + 3)  # every worker has re-read the policy by now
        after_reload = {w: len(served(server.stats(), f"r{w}-")[0]) for w in "ab"}
        state = cluster.wait_for_run(dag_id, run_id, timeout_s=120)
        at_end = {w: len(served(server.stats(), f"r{w}-")[0]) for w in "ab"}
        states = cluster.task_states(dag_id, run_id)
    finally:
        write_policy(cluster_session.policy, policy_document())
    cluster_session.timings["c. revoke scenario"] = time.monotonic() - began

    engine = cluster_session.store()
    try:
        from governed_ai.core.audit import AuditStore

        denials = AuditStore(engine).query(
            dag_id=dag_id, run_id=run_id, decision="deny", since=revoked_at, limit=None
        )
    finally:
        engine.dispose()
    calls_after_reload = {w: at_end[w] - after_reload[w] for w in "ab"}
    cluster_session.observed["c. revoke"] = (
        f"calls served after every worker re-read the policy {calls_after_reload}; denials "
        f"{sorted({r.task_id for r in denials})}; task states {states}"
    )
    assert {r.task_id for r in denials} == {"on_a", "on_b"}, (
        f"denied after the revocation: {sorted({r.task_id for r in denials})}; calls served after every "
        f"worker re-read the policy: {calls_after_reload}; task states {states}"
    )
    assert all(n <= REVOKE_CONCURRENCY for n in calls_after_reload.values()), calls_after_reload
    assert state == "failed" and states == {"on_a": "failed", "on_b": "failed"}, states


# -- d. two DAGs on two workers racing for one budget ---------------------------------------------------


def test_two_dags_on_two_workers_racing_for_one_budget_never_overspend_and_use_it(
    cluster_session: Session,
) -> None:
    cluster, server = cluster_session.cluster, cluster_session.server
    began = time.monotonic()
    server.reset_stats()
    runs = {"a": "mw_budget_a_1", "b": "mw_budget_b_1"}
    for w, run_id in runs.items():
        cluster.trigger(f"mw_budget_{w}", run_id)
    states = {w: cluster.wait_for_run(f"mw_budget_{w}", run_id) for w, run_id in runs.items()}
    cluster_session.timings["d. budget race"] = time.monotonic() - began
    stats = server.stats()

    workers = {d: w for w, d, r, _t, _n in cluster.executions() if r in runs.values()}
    assert workers == {"mw_budget_a": "a", "mw_budget_b": "b"}
    assert states == {"a": "success", "b": "success"}
    engine = cluster_session.store()
    try:
        from governed_ai.core.audit import AuditStore

        status = ledger_status(engine, "mw-race")
        calls = {
            w: [
                r.time
                for r in AuditStore(engine).query(dag_id=f"mw_budget_{w}", action="model.call", limit=None)
            ]
            for w in "ab"
        }
    finally:
        engine.dispose()
    # They really raced: each DAG's calls overlap the other's in time.
    assert min(calls["a"]) < max(calls["b"]) and min(calls["b"]) < max(calls["a"]), calls
    per_dag = {w: served(stats, f"b{w}-") for w in "ab"}
    assert all(len(successes) > 0 for successes, _ in per_dag.values()), "both DAGs spent from the budget"
    served_tokens = sum(tokens for _, tokens in per_dag.values())
    cluster_session.observed["d. race"] = (
        f"spent {status.spent_tokens} of {RACE_BUDGET_TOKENS} "
        f"({status.spent_tokens / RACE_BUDGET_TOKENS:.1%}), "
        f"held {status.reserved_tokens}, served {served_tokens}; items "
        f"{ {w: len(successes) for w, (successes, _) in per_dag.items()} }"
    )
    assert status.reserved_tokens == 0
    assert status.spent_tokens == served_tokens
    assert status.spent_tokens <= RACE_BUDGET_TOKENS
    assert status.spent_tokens >= 0.95 * RACE_BUDGET_TOKENS, (
        f"used {status.spent_tokens} of {RACE_BUDGET_TOKENS} tokens "
        f"({status.spent_tokens / RACE_BUDGET_TOKENS:.1%}); items served: "
        f"{ {w: len(s) for w, (s, _) in per_dag.items()} }"
    )
