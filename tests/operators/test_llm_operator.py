"""LLMOperator: parameter checks at parse time, templating mistakes at run time, execute over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from governed_ai.operators.llm import LLMOperator
from tests.fakes.openai_server import FakeOpenAIServer


class Answer(BaseModel):
    answer: str


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
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
    result = op.execute(context={})  # type: ignore[arg-type]
    assert result["output"] == {"answer": "42"}
    assert result["usage"]["total_tokens"] == 15
    assert result["model"] == "fake-model"
    import json

    json.dumps(result)  # XCom-safe


def test_execute_refuses_unknown_model_before_calling_it(fake):
    op = LLMOperator(task_id="t", prompt="q", model="gpt-typo", llm_conn_id="test_llm")
    with pytest.raises(ValueError, match="'gpt-typo' is not served.*'model' parameter"):
        op.execute(context={})  # type: ignore[arg-type]
    assert fake.chat_requests == []
