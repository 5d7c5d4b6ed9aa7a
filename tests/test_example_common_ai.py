"""The common_ai_governed example DAG in Airflow (dag.test()): a plain openai @task, a retried one and
common-ai's LLMOperator and AgentOperator, all through the governed client.

The endpoint is a named fake model server over real HTTP: FaultyFakeOpenAIServer, whose paid counter is
checked against the budget ledger and the audit trail, and ToolCallingServer, to script the agent's tool
call. Airflow, common-ai's operators, pydantic-ai and the openai SDK are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("airflow.providers.common.ai")

REPO = Path(__file__).resolve().parent.parent
GOVERNED_TASKS = ("plain_openai_call", "retried_after_paying", "common_ai_llm", "common_ai_agent")


@pytest.fixture
def governed_example(airflow_db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The example policy with a fresh governance store, and the governed pydantic-ai connection."""
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", f"sqlite:///{tmp_path / 'governance.db'}")
    monkeypatch.setenv(
        "AIRFLOW_CONN_GOVERNED_AI_PYDANTICAI_DEFAULT", json.dumps({"conn_type": "governed_ai_pydanticai"})
    )

    def run(server_connection: str):
        from airflow.dag_processing.dagbag import DagBag

        monkeypatch.setenv("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", server_connection)
        dagbag = DagBag(dag_folder=str(REPO / "example_dags" / "common_ai_governed.py"))
        assert dagbag.import_errors == {}
        return dagbag.dags["common_ai_governed"].test()

    return run


def connection_extra() -> dict[str, object]:
    return {
        "default_model": "smollm2",
        "max_retries": 0,
        "prices": {"smollm2": {"input_per_1m_tokens": 1.0, "output_per_1m_tokens": 2.0}},
    }


@pytest.mark.airflow
def test_every_caller_is_governed_and_the_paid_counter_equals_the_ledger(governed_example):
    from airflow.utils.state import DagRunState, TaskInstanceState

    from governed_ai.hooks.governance import GovernanceHook
    from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer

    with FaultyFakeOpenAIServer(FaultConfig(latency_ms=1, models=("smollm2",), record_bodies=True)) as server:
        run = governed_example(server.connection_json(**connection_extra()))
        stats = server.stats()

    assert run.state == DagRunState.SUCCESS
    states = {ti.task_id: ti for ti in run.get_task_instances()}
    assert all(ti.state == TaskInstanceState.SUCCESS for ti in states.values()), states
    assert states["retried_after_paying"].try_number == 2 and states["common_ai_llm"].try_number == 2

    governor = GovernanceHook().governor
    records = governor.audit.query(dag_id="common_ai_governed", run_id=run.run_id, order="asc", limit=None)
    calls = [r for r in records if r.action == "model.call"]
    assert {r.task_id for r in calls} == set(GOVERNED_TASKS)
    assert all((r.decision, r.rule, r.model) == ("allow", "common-ai-governed", "smollm2") for r in calls)
    assert [r.task_id for r in calls].count("retried_after_paying") == 1
    assert [r.task_id for r in calls].count("common_ai_llm") == 1
    replays = [r.task_id for r in records if r.action == "model.replay"]
    assert replays == ["retried_after_paying", "common_ai_llm"]  # the second tries paid nothing

    paid = sum(stats["successes"].values())
    assert paid == len(calls)
    (budget,) = [s for s in governor.ledger.status() if s.budget == "common-ai-per-run"]
    assert (
        budget.spent_tokens
        == sum(stats["tokens"].values())
        == sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in calls)
    )
    assert budget.reserved_tokens == 0
    assert governor.audit.verify().ok
    # Every request the endpoint saw was a chat completion with the policy's cap on reply tokens.
    assert {path for path, _ in server.request_bodies()} == {"/v1/chat/completions"}


@pytest.mark.airflow
def test_the_common_ai_agent_calls_its_tool_through_the_governed_model(governed_example):
    from airflow.utils.state import DagRunState

    from tests.fakes.openai_server import ScriptedReply
    from tests.fakes.tool_calling_server import ToolCallingServer, tool_calls

    with ToolCallingServer(models=("smollm2",), default=ScriptedReply(content="a short answer")) as server:
        server.script(
            "plain answer",  # plain_openai_call
            "retried answer",  # retried_after_paying, first try (the second replays it)
            "llm answer",  # common_ai_llm
            tool_calls(("order_status", {"order_id": "AB123456"})),  # common_ai_agent, step 1
            "Order AB123456 shipped on 2026-01-02.",  # common_ai_agent, step 2
        )
        run = governed_example(server.connection_json(**connection_extra()))
        requests = server.chat_requests

    assert run.state == DagRunState.SUCCESS
    states = {ti.task_id: ti for ti in run.get_task_instances()}
    assert (
        states["common_ai_agent"].xcom_pull(task_ids="common_ai_agent")
        == "Order AB123456 shipped on 2026-01-02."
    )
    assert states["common_ai_llm"].xcom_pull(task_ids="common_ai_llm") == "llm answer"
    assert (
        states["retried_after_paying"].xcom_pull(task_ids="retried_after_paying")["answer"]
        == "retried answer"
    )
    assert len(requests) == 5  # the retries were not sent
    tool_results = [m for m in requests[-1]["messages"] if m.get("role") == "tool"]
    assert tool_results and "shipped on 2026-01-02" in str(tool_results[0]["content"])
    assert all(r["max_tokens"] <= 128 for r in requests)  # the grant's max_tokens_per_call


@pytest.mark.airflow
@pytest.mark.real_model
def test_the_example_runs_on_the_real_local_model(airflow_db, local_model_connection, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    from governed_ai.hooks.governance import GovernanceHook

    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", f"sqlite:///{tmp_path / 'governance.db'}")
    monkeypatch.setenv(
        "AIRFLOW_CONN_GOVERNED_AI_PYDANTICAI_DEFAULT", json.dumps({"conn_type": "governed_ai_pydanticai"})
    )
    dagbag = DagBag(dag_folder=str(REPO / "example_dags" / "common_ai_governed.py"))
    run = dagbag.dags["common_ai_governed"].test()

    assert run.state == DagRunState.SUCCESS
    records = GovernanceHook().governor.audit.query(
        dag_id="common_ai_governed", run_id=run.run_id, limit=None
    )
    assert {r.task_id for r in records if r.action == "model.call"} == set(GOVERNED_TASKS)
    replays = sorted(r.task_id for r in records if r.action == "model.replay")
    assert replays == ["common_ai_llm", "retried_after_paying"]
