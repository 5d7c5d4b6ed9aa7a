"""The flagship DAGs on a running Airflow: ``airflow standalone`` with the provider installed.

Starts standalone (LocalExecutor, low parallelism) on a free port with a private AIRFLOW_HOME, points the
LLM connection at the real local model, triggers the flagship DAGs through the REST API, waits for them,
then checks their results, the audit trail and the budget ledger. Stops exactly what it started.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from governed_ai.local_model import CONNECTION_ENV, connection_json
from tests.production.standalone import Standalone, start_standalone

REPO = Path(__file__).resolve().parents[2]
FLAGSHIPS = ["kb_ingest", "support_triage", "order_agent", "catalog_enrichment"]


@pytest.fixture(scope="module")
def airflow(local_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standalone]:
    home = tmp_path_factory.mktemp("standalone-home")
    server = start_standalone(
        home,
        {
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "example_dags"),
            "AIRFLOW__GOVERNED_AI__POLICY_PATH": str(REPO / "example_dags/policies/governance_policy.yaml"),
            CONNECTION_ENV: connection_json(local_model),
        },
    )
    try:
        yield server
    finally:
        server.stop()
    assert server.process.poll() is not None, "standalone is still running after stop()"


def wait_for_dags(server: Standalone, dag_ids: list[str], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    missing = list(dag_ids)
    while missing and time.monotonic() < deadline:
        for dag_id in list(missing):
            try:
                server.request("GET", f"/api/v2/dags/{dag_id}")
                missing.remove(dag_id)
            except Exception:  # 404 until the DAG processor has parsed the file
                pass
        time.sleep(2)
    assert not missing, f"DAGs never appeared: {missing}\n{server.log_tail()}"


def trigger(server: Standalone, dag_id: str) -> str:
    server.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
    run = server.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None})
    return str(run["dag_run_id"])


def wait_for_run(server: Standalone, dag_id: str, run_id: str, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = server.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
        if state in ("success", "failed"):
            return str(state)
        time.sleep(3)
    raise AssertionError(f"{dag_id} {run_id} did not finish in {timeout_s} s\n{server.log_tail()}")


def failed_tasks(server: Standalone, dag_id: str, run_id: str) -> list[str]:
    tis = server.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
    return [f"{t['task_id']}={t['state']}" for t in tis if t["state"] not in ("success", "skipped")]


@pytest.mark.standalone
@pytest.mark.real_model
# Five DAGs on the real local model in series plus the standalone's start and stop: 8-10 minutes on two
# busy cores, too close to the suite's 600 s hang guard (which counts fixtures too).
@pytest.mark.timeout(1200)
def test_flagship_dags_run_on_a_real_airflow(airflow: Standalone) -> None:
    wait_for_dags(airflow, FLAGSHIPS)
    # The knowledge base first: the triage DAG's sensor waits for it (it would reschedule otherwise).
    ingest_run = trigger(airflow, "kb_ingest")
    assert wait_for_run(airflow, "kb_ingest", ingest_run) == "success", failed_tasks(
        airflow, "kb_ingest", ingest_run
    )
    runs = {dag_id: trigger(airflow, dag_id) for dag_id in FLAGSHIPS[1:]}
    for dag_id, run_id in runs.items():
        state = wait_for_run(airflow, dag_id, run_id)
        assert state == "success", (dag_id, failed_tasks(airflow, dag_id, run_id))

    provider_home = airflow.home / "governed_ai"
    triage = sorted((provider_home / "outputs" / "support_triage").glob("*.quarantine.jsonl"))
    assert triage, "support_triage wrote no results"
    results = (
        (triage[-1].parent / triage[-1].name.replace(".quarantine.jsonl", ".jsonl")).read_text().splitlines()
    )
    assert results and all(json.loads(line)["sentiment"] in ("negative", "positive") for line in results)
    enriched = (provider_home / "outputs" / "catalog_enrichment" / "enriched.jsonl").read_text().splitlines()
    assert enriched

    from governed_ai.core.audit import AuditStore
    from governed_ai.core.audit_anchors import AnchorLog
    from governed_ai.core.keys import read_key_file
    from governed_ai.core.ledger import BudgetLedger
    from governed_ai.core.sqlstore import create_store_engine

    engine = create_store_engine(f"sqlite:///{provider_home / 'governance.db'}")
    try:
        # Single machine: the tasks created the fallback key file and anchored under the provider home.
        audit = AuditStore(
            engine,
            key=read_key_file(provider_home / "audit.key"),
            anchors=AnchorLog(provider_home / "anchors"),
        )
        verification = audit.verify()
        assert verification.ok, verification.problem
        by_dag = {r.dag_id for r in audit.query(limit=None)}
        assert set(FLAGSHIPS) <= by_dag
        assert audit.query(dag_id="order_agent", decision="deny", limit=None), (
            "the refund tool was not refused"
        )
        budgets = {s.budget for s in BudgetLedger(engine).status()}
        assert {"support-daily", "enrichment-daily"} <= budgets
    finally:
        engine.dispose()
