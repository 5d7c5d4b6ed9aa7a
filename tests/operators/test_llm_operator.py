"""LLMOperator: parameter checks at parse time, templating mistakes at run time, execute over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from pydantic import BaseModel

from governed_ai.operators.llm import LLMOperator
from tests.conftest import fake_context
from tests.fakes.openai_server import FakeOpenAIServer

POLICY = """
version: 1
rules:
  - name: unit-tests
    match: {dag_id: unit_dag}
    models:
      - {connection: test_llm, model: "fake-*", max_tokens_per_call: 100}
      - {connection: test_llm, model: "gpt-typo"}
    model_routes:
      default: {model: fake-missing, fallbacks: [fake-model]}
budgets:
  - {name: unit-run, scope: global, period: run, max_tokens: 1000}
"""


class Answer(BaseModel):
    answer: str


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, governance_policy) -> Iterator[FakeOpenAIServer]:
    governance_policy(POLICY)
    with FakeOpenAIServer(models=("fake-model",)) as server:
        monkeypatch.setenv("AIRFLOW_CONN_TEST_LLM", server.connection_json(default_model="fake-model"))
        yield server


def test_requires_prompt_or_messages():
    with pytest.raises(ValueError, match="'prompt'.*'messages'"):
        LLMOperator(task_id="t")


def test_rejects_schema_that_is_not_a_pydantic_class():
    with pytest.raises(TypeError, match="'output_schema' must be a pydantic model class.*got a dict"):
        LLMOperator(task_id="t", prompt="x", output_schema={"type": "object"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got an instance"):
        LLMOperator(task_id="t", prompt="x", output_schema=Answer(answer="a"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [({"max_tokens": 0}, "max_tokens"), ({"max_repair_attempts": 11}, "max_repair_attempts")],
)
def test_rejects_out_of_range_numbers(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        LLMOperator(task_id="t", prompt="x", **kwargs)


def test_empty_rendered_prompt_is_an_error_naming_prompt():
    op = LLMOperator(task_id="t", prompt="{{ params.missing }}")
    op.prompt = "   "  # what rendering an undefined value produces
    with pytest.raises(ValueError, match="'prompt' rendered to an empty string"):
        op.rendered_messages()


def test_malformed_messages_are_reported_with_index():
    op = LLMOperator(task_id="t", messages=[{"role": "user", "content": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        op.rendered_messages()


def test_message_order_system_history_prompt():
    op = LLMOperator(
        task_id="t", prompt="now", system_prompt="sys", messages=[{"role": "user", "content": "before"}]
    )
    assert [m["content"] for m in op.rendered_messages()] == ["sys", "before", "now"]


def test_template_fields_cover_the_text_inputs():
    assert set(LLMOperator.template_fields) == {"prompt", "system_prompt", "messages", "model"}


def test_execute_returns_json_safe_result(fake):
    fake.script('{"answer": "42"}')
    op = LLMOperator(task_id="t", prompt="q", output_schema=Answer, llm_conn_id="test_llm")
    result = op.execute(context=fake_context())  # type: ignore[arg-type]
    assert result["output"] == {"answer": "42"}
    assert result["governance"]["rule"] == "unit-tests"
    assert result["governance"]["prompt_version"].startswith("sha256:")
    assert result["usage"]["total_tokens"] == 15
    assert result["model"] == "fake-model"
    import json

    json.dumps(result)  # XCom-safe


def test_execute_refuses_unknown_model_before_calling_it(fake):
    op = LLMOperator(task_id="t", prompt="q", model="gpt-typo", max_tokens=50, llm_conn_id="test_llm")
    with pytest.raises(Exception, match="'gpt-typo' is not served.*'model' parameter"):
        op.execute(context=fake_context())  # type: ignore[arg-type]
    assert fake.chat_requests == []


def test_denied_model_fails_without_retry_and_never_reaches_the_server(fake):
    op = LLMOperator(task_id="t", prompt="q", model="gpt-4o", llm_conn_id="test_llm")
    with pytest.raises(AirflowFailException, match="denied by governance.*gpt-4o"):
        op.execute(context=fake_context())  # type: ignore[arg-type]
    assert fake.chat_requests == []


def test_other_dag_is_denied_even_for_a_granted_model(fake):
    op = LLMOperator(task_id="t", prompt="q", model="fake-model", llm_conn_id="test_llm")
    with pytest.raises(AirflowFailException, match="other_dag"):
        op.execute(context=fake_context(dag_id="other_dag"))  # type: ignore[arg-type]
    assert fake.chat_requests == []


def test_route_alias_falls_back_to_a_served_model(fake):
    op = LLMOperator(task_id="t", prompt="q", model="default", llm_conn_id="test_llm")
    result = op.execute(context=fake_context())  # type: ignore[arg-type]
    assert result["model"] == "fake-model"
    assert result["governance"]["fallbacks_tried"] == ["fake-missing"]


def test_policy_caps_max_tokens(fake):
    op = LLMOperator(task_id="t", prompt="q", max_tokens=5000, llm_conn_id="test_llm")
    op.execute(context=fake_context())  # type: ignore[arg-type]
    assert fake.chat_requests[0]["max_tokens"] == 100


def test_budget_stop_names_the_budget(fake):
    op = LLMOperator(task_id="t", prompt="q", max_tokens=100, llm_conn_id="test_llm")
    for _ in range(3):
        op.execute(context=fake_context())  # type: ignore[arg-type]
    # Each call reserves ~100+ tokens against 1,000 but settles 15; a 2,000-token reservation cannot fit.
    big = LLMOperator(task_id="t", prompt="q" * 5000, llm_conn_id="test_llm")
    with pytest.raises(AirflowFailException, match="budget 'unit-run'"):
        big.execute(context=fake_context())  # type: ignore[arg-type]
    assert len(fake.chat_requests) == 3


def test_prompt_is_redacted_before_it_leaves(fake):
    op = LLMOperator(
        task_id="t", prompt="Mail jane.doe@example.com card 4111 1111 1111 1111", llm_conn_id="test_llm"
    )
    op.execute(context=fake_context())  # type: ignore[arg-type]
    sent = fake.chat_requests[0]["messages"][-1]["content"]
    assert "jane.doe@example.com" not in sent and "4111" not in sent
    assert "[REDACTED:EMAIL]" in sent


# -- approval by policy: the answer as Airflow hands it to the resumed task --------------------------------

APPROVAL_POLICY = POLICY.replace(
    "budgets:",
    "  - name: unit-approval\n    match: {dag_id: unit_dag}\n"
    "    require_approval:\n      - {models: [fake-model], approvers: [alice]}\nbudgets:",
)
ASKED = {"action": "model", "resource": "test_llm/fake-model", "rule": "unit-approval",
         "approvers": ["alice"], "estimated_cost_usd": None}  # fmt: skip


@pytest.fixture
def approval_fake(monkeypatch: pytest.MonkeyPatch, governance_policy) -> Iterator[FakeOpenAIServer]:
    governance_policy(APPROVAL_POLICY)
    with FakeOpenAIServer(models=("fake-model",)) as server:
        monkeypatch.setenv("AIRFLOW_CONN_TEST_LLM", server.connection_json(default_model="fake-model"))
        yield server


def approval_records(operator: LLMOperator) -> list[Any]:
    return [r for r in operator.governance.governor.audit.query(order="asc", limit=None)
            if r.action.startswith("approval.")]  # fmt: skip


@pytest.mark.parametrize(
    ("event", "outcome", "approver", "message"),
    [
        ({"error": "no answer", "error_type": "timeout"}, "timed_out", None, "not approved in time"),
        ({"chosen_options": ["Reject"], "responded_by_user": {"id": "alice", "name": "alice"}}, "rejected",
         "alice", "rejected by alice"),
        # Airflow checks assigned users on its REST API; the operator checks the policy's list again.
        ({"chosen_options": ["Approve"], "responded_by_user": {"id": "mallory", "name": "mallory"}},
         "rejected", "mallory", "not one of the policy's approvers"),
        ({"chosen_options": ["Approve"], "responded_by_user": None, "timedout": True}, "timed_out", None,
         "not approved in time"),
    ],
)  # fmt: skip
def test_a_resumed_task_without_a_valid_approval_fails_for_good_and_is_audited(
    approval_fake, event, outcome, approver, message
):
    operator = LLMOperator(task_id="unit_task", prompt="hi", model="fake-model", llm_conn_id="test_llm")
    with pytest.raises(AirflowFailException, match=message):
        operator.resume_after_approval(fake_context(), event=event, approval=ASKED)
    (record,) = approval_records(operator)
    assert (record.action, record.decision, record.outcome) == ("approval.rejected", "deny", outcome)
    assert record.extra["approver"] == approver
    assert approval_fake.chat_requests == []


def test_an_approved_resume_runs_the_call_and_audits_the_approver(approval_fake):
    operator = LLMOperator(task_id="unit_task", prompt="hi", model="fake-model", llm_conn_id="test_llm")
    event = {"chosen_options": ["Approve"], "responded_by_user": {"id": "alice", "name": "alice"}}
    result = operator.resume_after_approval(fake_context(), event=event, approval=ASKED)
    assert result["model"] == "fake-model" and len(approval_fake.chat_requests) == 1
    (granted,) = approval_records(operator)
    assert (granted.action, granted.decision) == ("approval.granted", "allow")
    assert granted.extra["approver"] == "alice"
