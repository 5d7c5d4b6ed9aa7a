"""The order_agent example DAG: its tools, and a full run in Airflow (dag.test()) on the real local model."""

from __future__ import annotations

from pathlib import Path

import pytest

from example_dags import order_tools

EXAMPLE_DAGS = Path(__file__).resolve().parent.parent / "example_dags"


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(EXAMPLE_DAGS))


def test_order_agent_is_a_scheduled_job_owned_by_support(dagbag):
    assert "order_agent" in dagbag.dag_ids
    assert not {path: error for path, error in dagbag.import_errors.items() if "order_" in path}
    dag = dagbag.dags["order_agent"]
    assert dag.schedule == "@daily"
    assert dag.catchup is False
    assert {t.owner for t in dag.tasks} == {"support-ai"}
    assert set(dag.task_ids) == {"answer_question", "attempt_refund", "audit_report"}


def test_example_tools_read_the_shipped_data():
    registry = order_tools.ORDER_TOOLS
    assert registry.names() == ["issue_refund", "lookup_order", "search_kb"]
    lookup = registry.get("lookup_order")
    found = lookup.run(lookup.validate({"order_id": "AB123456"}))
    assert (found["found"], found["status"], found["carrier"]) == (True, "shipped", "DHL")
    assert lookup.run(lookup.validate({"order_id": "ZZ999999"})) == {"order_id": "ZZ999999", "found": False}
    search = registry.get("search_kb")
    hits = search.run(search.validate({"query": "return a broken kettle"}))
    assert hits[0]["id"] == "kb-returns"
    assert registry.get("issue_refund").side_effects is True
    assert [t.name for t in registry if t.side_effects] == ["issue_refund"]


@pytest.mark.airflow
@pytest.mark.real_model
def test_order_agent_runs_looks_up_and_is_refused_the_refund(airflow_db, local_model_connection, dagbag):
    from airflow.utils.state import DagRunState, TaskInstanceState

    from governed_ai.hooks.governance import GovernanceHook

    dag = dagbag.dags["order_agent"]
    run = dag.test()
    assert run.state == DagRunState.SUCCESS

    tis = run.get_task_instances()
    answers = sorted((ti for ti in tis if ti.task_id == "answer_question"), key=lambda ti: ti.map_index)
    assert [ti.map_index for ti in answers] == [0, 1]
    assert all(ti.state == TaskInstanceState.SUCCESS for ti in answers)
    refund = next(ti for ti in tis if ti.task_id == "attempt_refund")
    assert refund.state == TaskInstanceState.FAILED
    assert refund.try_number == 1  # a denial is final, although retries are configured
    assert next(ti for ti in tis if ti.task_id == "audit_report").state == TaskInstanceState.SUCCESS

    for ti in answers:
        xcom = ti.xcom_pull(task_ids="answer_question", map_indexes=ti.map_index)
        assert xcom["offered_tools"] == ["lookup_order", "search_kb"]
        assert xcom["withheld_tools"] == ["issue_refund"]
        tools_used = [s["tool"] for s in xcom["transcript"] if s["kind"] == "tool"]
        assert tools_used and set(tools_used) <= {"lookup_order", "search_kb"}
        assert xcom["stop_reason"] == "final" and isinstance(xcom["final"], str)

    audit = GovernanceHook().governor.audit
    records = audit.query(dag_id="order_agent", run_id=run.run_id, order="asc", limit=None)
    allowed = [
        (r.task_id, r.map_index) for r in records if r.action == "tool.authorize" and r.decision == "allow"
    ]
    assert sorted(set(allowed)) == [("answer_question", 0), ("answer_question", 1)]
    denied = [(r.task_id, r.resource, r.rule) for r in records if r.decision == "deny"]
    assert denied == [("attempt_refund", "issue_refund", None)]
    assert not [r for r in records if r.action == "tool.call" and r.resource == "issue_refund"]
    assert not order_tools.refunds_file().exists()
    assert {r.rule for r in records if r.action == "model.call"} == {"order-agent"}
    assert audit.verify().ok
