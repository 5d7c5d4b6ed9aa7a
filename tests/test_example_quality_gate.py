"""The support_quality_gate example DAG: loads cleanly, and in Airflow (dag.test()) every ticket ends up
either in the results or in quarantine, on the real local model and on a scripted fake one."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DAGS = REPO / "example_dags"
DAG_ID = "support_quality_gate"


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(EXAMPLE_DAGS))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_files(module, run_id: str) -> tuple[Path, Path]:
    stem = module._file_stem(run_id)
    return module.output_dir() / f"{stem}.results.jsonl", module.output_dir() / f"{stem}.quarantine.jsonl"


def test_dag_loads_as_a_scheduled_support_job(dagbag):
    assert not [path for path in dagbag.import_errors if DAG_ID in path]
    dag = dagbag.dags[DAG_ID]
    assert dag.schedule == "@daily"
    assert "support" in dag.tags
    assert dag.get_task("quality_gate").outcome == "quarantine"
    assert {t.task_id for t in dag.get_task("route").downstream_list} == {"write_results", "write_quarantine"}
    assert {t.owner for t in dag.tasks} == {"support-ai"}


def assert_no_ticket_lost(module, run_id: str) -> tuple[list[dict], list[dict]]:
    results_path, quarantine_path = run_files(module, run_id)
    passed = read_jsonl(results_path)
    quarantined = read_jsonl(quarantine_path) if quarantine_path.exists() else []
    tickets = [json.loads(line) for line in module.DATA_FILE.read_text().splitlines() if line.strip()]
    passed_ids = [row["ticket_id"] for row in passed]
    quarantined_ids = [item["row"]["ticket_id"] for item in quarantined]
    assert sorted(passed_ids + quarantined_ids) == sorted(t["ticket_id"] for t in tickets)
    return passed, quarantined


@pytest.mark.airflow
@pytest.mark.real_model
def test_gate_on_the_real_model_passes_or_quarantines_every_ticket(
    airflow_db, local_model_connection, dagbag
):
    from airflow.utils.state import DagRunState, TaskInstanceState

    from governed_ai.core.validation import apply_outcome, run_suite
    from governed_ai.hooks.governance import GovernanceHook

    module = importlib.import_module("example_dags.support_quality_gate")
    run = dagbag.dags[DAG_ID].test()
    assert run.state == DagRunState.SUCCESS
    passed, quarantined = assert_no_ticket_lost(module, run.run_id)

    # What passed really passes the suite; what was quarantined says why.
    for row in passed:
        row["content"] = json.dumps({"sentiment": row["sentiment"], "summary": row["summary"]})
    recheck = apply_outcome(run_suite(module.SUITE, passed), passed, outcome="quarantine", allow_empty=True)
    assert recheck.quarantined_rows == [], recheck.report.to_text()
    assert all(item["reasons"] for item in quarantined)

    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    expected_quarantine_state = TaskInstanceState.SUCCESS if quarantined else TaskInstanceState.SKIPPED
    assert states["write_quarantine"] == expected_quarantine_state

    [record] = GovernanceHook().governor.audit.query(
        dag_id=DAG_ID, run_id=run.run_id, action="validation.run"
    )
    assert record.resource == "support_ticket_classification"
    assert record.extra["rows"] == 8 and record.extra["quarantined_rows"] == len(quarantined)


@pytest.mark.airflow
def test_quarantine_branch_with_a_scripted_model(airflow_db, dagbag, monkeypatch):
    """A named fake model server answers two of the eight tickets badly: exactly those two are quarantined."""
    from airflow.utils.state import DagRunState, TaskInstanceState

    from governed_ai.local_model import CONNECTION_ENV, NOMINAL_PRICE
    from tests.fakes.openai_server import FakeOpenAIServer

    module = importlib.import_module("example_dags.support_quality_gate")
    good = json.dumps({"sentiment": "negative", "summary": "customer reports a problem"})
    with FakeOpenAIServer(models=("smollm2",)) as server:
        monkeypatch.setenv(
            CONNECTION_ENV,
            # Priced like the local model: the support budgets limit cost, and an unpriced model is refused.
            server.connection_json(
                default_model="smollm2", structured_output="json_object", prices={"smollm2": NOMINAL_PRICE}
            ),
        )
        # The order in which mapped tasks run does not matter: any two tickets get the bad replies.
        server.script(
            json.dumps({"sentiment": "positive", "summary": "I don't know"}),  # a refusal
            *[good] * 3,
            json.dumps({"sentiment": "negative", "summary": "refund"}),  # too short to be useful
            *[good] * 3,
        )
        run = dagbag.dags[DAG_ID].test()
    assert run.state == DagRunState.SUCCESS
    passed, quarantined = assert_no_ticket_lost(module, run.run_id)
    assert len(passed) == 6 and len(quarantined) == 2
    reasons = sorted(reason for item in quarantined for reason in item["reasons"])
    assert reasons == [
        "length:summary: 6 characters, expected 12 to 160",
        'not_refusal:summary: looks like a refusal or "I don\'t know"',
    ]
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["write_quarantine"] == TaskInstanceState.SUCCESS
