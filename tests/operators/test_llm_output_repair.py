"""The structured-output repair loop end to end through LLMOperator and governance: a scripted server
first returns invalid JSON, then valid JSON."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import pytest
from pydantic import BaseModel

from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.llm import LLMOperator
from tests.conftest import fake_context
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

POLICY = """
version: 1
rules:
  - name: unit-tests
    match: {dag_id: unit_dag}
    models:
      - {connection: test_llm, model: "fake-*"}
budgets:
  - {name: unit-run, scope: global, period: run, max_tokens: 10000}
"""


class Triage(BaseModel):
    label: Literal["bug", "billing"]
    urgency: int


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, governance_policy) -> Iterator[FakeOpenAIServer]:
    governance_policy(POLICY)
    with FakeOpenAIServer(models=("fake-model",)) as server:
        monkeypatch.setenv("AIRFLOW_CONN_TEST_LLM", server.connection_json(default_model="fake-model"))
        yield server


def test_invalid_json_then_valid_json_is_repaired(fake):
    broken = '{"label": "bug", "urgency": '
    fake.script(
        ScriptedReply(content=broken, prompt_tokens=20, completion_tokens=7),
        ScriptedReply(content='{"label": "bug", "urgency": 3}', prompt_tokens=45, completion_tokens=9),
    )
    op = LLMOperator(task_id="t", prompt="App crashes on start", output_schema=Triage, llm_conn_id="test_llm")
    result = op.execute(context=fake_context())  # type: ignore[arg-type]

    assert result["output"] == {"label": "bug", "urgency": 3}
    assert result["attempts"] == 2
    assert result["usage"]["total_tokens"] == 20 + 7 + 45 + 9

    first, second = fake.chat_requests
    assert second["messages"][: len(first["messages"])] == first["messages"]
    assert second["messages"][-2] == {"role": "assistant", "content": broken}
    repair = second["messages"][-1]
    assert repair["role"] == "user"
    assert "did not match the required JSON schema" in repair["content"]
    assert "Invalid JSON" in repair["content"]

    # Both attempts were paid for: each has its audit record.
    governor = GovernanceHook().governor
    calls = governor.audit.query(dag_id="unit_dag", action="model.call", order="asc")
    assert [(c.prompt_tokens, c.completion_tokens) for c in calls] == [(20, 7), (45, 9)]


def test_code_fenced_json_needs_no_repair(fake):
    fake.script('```json\n{"label": "billing", "urgency": 1}\n```')
    op = LLMOperator(task_id="t", prompt="Charged twice", output_schema=Triage, llm_conn_id="test_llm")
    result = op.execute(context=fake_context())  # type: ignore[arg-type]
    assert result["output"] == {"label": "billing", "urgency": 1}
    assert result["attempts"] == 1
    assert len(fake.chat_requests) == 1
