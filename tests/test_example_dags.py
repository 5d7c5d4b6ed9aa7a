"""The example DAGs load cleanly and run end to end in Airflow (dag.test()) against the real local model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DAGS = REPO / "example_dags"


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(EXAMPLE_DAGS))


def test_example_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "support_triage" in dagbag.dag_ids


def test_support_triage_is_a_scheduled_job(dagbag):
    dag = dagbag.dags["support_triage"]
    assert dag.schedule == "@daily"
    assert dag.catchup is False


@pytest.mark.airflow
@pytest.mark.real_model
def test_support_triage_runs_end_to_end_on_the_real_model(airflow_db, local_model_connection, dagbag):
    from airflow.utils.state import DagRunState

    import example_dags.support_triage as module

    assert dagbag.dags["kb_ingest"].test().state == DagRunState.SUCCESS  # what the sensor waits for
    run = dagbag.dags["support_triage"].test()
    assert run.state == DagRunState.SUCCESS

    stem = sorted(module.output_dir().glob("*.quarantine.jsonl"))[-1].name.removesuffix(".quarantine.jsonl")
    results = [json.loads(line) for line in (module.output_dir() / f"{stem}.jsonl").read_text().splitlines()]
    held = [
        json.loads(line)
        for line in (module.output_dir() / f"{stem}.quarantine.jsonl").read_text().splitlines()
    ]
    tickets = [json.loads(line) for line in module.DATA_FILE.read_text().splitlines() if line.strip()]
    # Every ticket is accounted for exactly once: classified and validated, or quarantined with reasons.
    held_ids = [h["row"]["ticket_id"] for h in held]
    assert sorted([r["ticket_id"] for r in results] + held_ids) == sorted(t["ticket_id"] for t in tickets)
    assert len(results) >= len(tickets) // 2, held
    for row in results:
        module.TicketClassification.model_validate({"sentiment": row["sentiment"], "summary": row["summary"]})
        assert row["kb_article"].endswith(".md")
    assert all(h["reasons"] for h in held)


@pytest.mark.airflow
@pytest.mark.real_model
def test_governance_showcase_allows_denies_and_stops_on_budget(airflow_db, local_model_connection, dagbag):
    from airflow.utils.state import TaskInstanceState

    from governed_ai.hooks.governance import GovernanceHook

    dag = dagbag.dags["governance_showcase"]
    run = dag.test()
    states = {ti.task_id: ti for ti in run.get_task_instances()}
    assert states["allowed_call"].state == TaskInstanceState.SUCCESS
    assert states["denied_model"].state == TaskInstanceState.FAILED
    assert states["near_the_limit"].state == TaskInstanceState.SUCCESS
    assert states["over_budget"].state == TaskInstanceState.FAILED
    assert states["audit_report"].state == TaskInstanceState.SUCCESS
    # A denial is final: no retry although the DAG's default_args allow two.
    assert states["denied_model"].try_number == 1

    audit = GovernanceHook().governor.audit
    records = audit.query(dag_id="governance_showcase", run_id=run.run_id, order="asc")
    denied = [r for r in records if r.decision == "deny"]
    assert {(r.task_id, r.action) for r in denied} == {
        ("denied_model", "model.authorize"),
        ("over_budget", "budget.deny"),
    }
    assert "showcase-per-run" in next(r.error for r in denied if r.action == "budget.deny")
    calls = [(r.task_id, r.model) for r in records if r.action == "model.call"]
    # Past 15% of the run's budget, the route 'default' switched to its cheaper model, and said so.
    assert calls == [("allowed_call", "smollm2"), ("near_the_limit", "smollm2-economy")]
    (route,) = [r for r in records if r.action == "model.route"]
    assert (route.extra["from"], route.extra["to"], route.extra["budget"]) == (
        "smollm2",
        "smollm2-economy",
        "showcase-per-run",
    )
    xcom = states["near_the_limit"].xcom_pull(task_ids="near_the_limit")
    assert (
        xcom["model"] == "smollm2-economy" and xcom["governance"]["budget_route"]["to"] == "smollm2-economy"
    )
    assert audit.verify().ok
