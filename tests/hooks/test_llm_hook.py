"""LLMHook: connection settings and the Test button; chat through the governed client it builds the transport
for, against FakeOpenAIServer (real HTTP through the openai SDK) and against the real local model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import pytest
from pydantic import BaseModel

from governed_ai.core.chat import ChatRequest, ChatResult
from governed_ai.core.errors import (
    ConfigurationError,
    ModelNotServed,
    ModelUnavailable,
    StructuredOutputError,
)
from governed_ai.core.llm_settings import ConnectionConfigError
from governed_ai.hooks.llm import LLMHook
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

CONN_ENV = "AIRFLOW_CONN_TEST_LLM"
POLICY = """
version: 1
defaults: {redact_prompts: false, redact_outputs: false}
rules:
  - name: hook-tests
    match: {dag_id: "*"}
    models:
      - {connection: test_llm, model: "*"}
      - {connection: governed_ai_llm_default, model: smollm2}
"""


class Ticket(BaseModel):
    label: Literal["bug", "billing"]
    urgency: int


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(models=("fake-model", "other-model")) as server:
        yield server


def make_hook(monkeypatch: pytest.MonkeyPatch, server: FakeOpenAIServer, **extra: object) -> LLMHook:
    extra.setdefault("default_model", "fake-model")
    extra.setdefault("max_retries", 2)
    monkeypatch.setenv(CONN_ENV, server.connection_json(**extra))
    return LLMHook(llm_conn_id="test_llm")


@pytest.fixture
def chat(client_for_connection):  # type: ignore[no-untyped-def]
    """Sends one request through a governed client on the ``test_llm`` connection."""

    def send(content: str = "x", **request: object) -> ChatResult:
        client = client_for_connection(POLICY, conn_id="test_llm")
        request.setdefault("model", "")
        return client.chat(ChatRequest(messages=[{"role": "user", "content": content}], **request)).result

    return send


def test_plain_chat_returns_content_usage_and_cost(monkeypatch, fake, chat):
    prices = {"fake-*": {"input_per_1m_tokens": 1_000_000, "output_per_1m_tokens": 2_000_000}}
    make_hook(monkeypatch, fake, prices=prices)
    fake.script(ScriptedReply(content="hello", prompt_tokens=7, completion_tokens=3))

    result = chat("hi", temperature=0.2, max_tokens=9)

    assert result.content == "hello"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (7, 3)
    assert result.cost_usd == pytest.approx(7 * 1.0 + 3 * 2.0)
    sent = fake.chat_requests[0]
    assert sent["model"] == "fake-model"
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 9
    assert "response_format" not in sent


def test_structured_output_uses_json_schema_by_default(monkeypatch, fake, chat):
    make_hook(monkeypatch, fake)
    fake.script('{"label": "bug", "urgency": 2}')
    result = chat(output_schema=Ticket)
    assert result.output == {"label": "bug", "urgency": 2}
    fmt = fake.chat_requests[0]["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"]["properties"]["label"]["enum"] == ["bug", "billing"]


def test_structured_output_translates_to_json_object_for_llama_style_servers(monkeypatch, fake, chat):
    make_hook(monkeypatch, fake, structured_output="json_object")
    fake.script('{"label": "billing", "urgency": 1}')
    chat(output_schema=Ticket)
    fmt = fake.chat_requests[0]["response_format"]
    assert fmt["type"] == "json_object"
    assert fmt["schema"]["required"] == ["label", "urgency"]


def test_repair_loop_sends_validation_errors_back_and_sums_usage(monkeypatch, fake, chat):
    make_hook(monkeypatch, fake)
    fake.script(
        ScriptedReply(content='{"label": "feature", "urgency": 2}', prompt_tokens=10, completion_tokens=4),
        ScriptedReply(content='{"label": "bug", "urgency": 2}', prompt_tokens=30, completion_tokens=4),
    )
    result = chat(output_schema=Ticket)

    assert result.output == {"label": "bug", "urgency": 2}
    assert result.attempts == 2
    assert result.usage.prompt_tokens == 40
    repair_turn = fake.chat_requests[1]["messages"][-1]
    assert repair_turn["role"] == "user"
    assert "label" in repair_turn["content"] and "did not match" in repair_turn["content"]
    assert fake.chat_requests[1]["messages"][-2] == {
        "role": "assistant",
        "content": '{"label": "feature", "urgency": 2}',
    }


def test_repair_gives_up_with_readable_error(monkeypatch, fake, chat):
    make_hook(monkeypatch, fake)
    fake.script("not json at all", '{"label": "bug"}')
    with pytest.raises(StructuredOutputError) as err:
        chat(output_schema=Ticket, max_repair_attempts=1)
    message = str(err.value)
    assert "Ticket" in message and "2 attempt(s)" in message
    assert "urgency" in message  # names the missing field
    assert len(fake.chat_requests) == 2


def test_retries_429_honouring_retry_after(monkeypatch, fake, chat):
    make_hook(monkeypatch, fake)
    fake.script(ScriptedReply(status=429, headers={"Retry-After": "0"}, content="slow down"), "fine")
    result = chat()
    assert result.content == "fine"
    assert len(fake.chat_requests) == 2


def test_retries_5xx_then_fails_with_explanation(monkeypatch, fake, chat):
    make_hook(monkeypatch, fake, max_retries=1)
    fake.default = ScriptedReply(status=503, headers={"Retry-After": "0"}, content="overloaded")
    with pytest.raises(ModelUnavailable, match="test_llm"):
        chat()
    assert len(fake.chat_requests) == 2  # first try + one retry


def test_404_names_the_model_parameter(monkeypatch, fake, chat):
    make_hook(monkeypatch, fake, max_retries=0)
    fake.script(ScriptedReply(status=404, content="model other-model does not exist"))
    with pytest.raises(ModelNotServed, match="'model' parameter"):
        chat(model="other-model")


def test_missing_model_names_both_places_to_set_it(monkeypatch, fake, chat):
    make_hook(monkeypatch, fake, default_model="")
    with pytest.raises(ConfigurationError, match="'model' parameter.*default_model"):
        chat()


def test_a_model_the_endpoint_does_not_list_is_refused_before_anything_is_sent(monkeypatch, fake, chat):
    make_hook(monkeypatch, fake)
    assert chat(model="other-model").content == "ok"
    with pytest.raises(ModelNotServed, match="not served.*fake-model"):
        chat(model="gpt-typo")
    assert [r["model"] for r in fake.chat_requests] == ["other-model"]


def test_bad_connection_extra_is_reported_with_field(monkeypatch, fake):
    hook = make_hook(monkeypatch, fake, structured_output="xml", timeout=-1)
    with pytest.raises(ConnectionConfigError) as err:
        _ = hook.settings
    assert "structured_output" in str(err.value) and "timeout" in str(err.value)


def test_connection_test_spends_no_tokens(monkeypatch, fake):
    hook = make_hook(monkeypatch, fake)
    ok, message = hook.test_connection()
    assert ok, message
    assert fake.chat_requests == []
    assert any(p.endswith("/models") for p in fake.paths)


def test_connection_test_reports_unserved_default_model(monkeypatch, fake):
    hook = make_hook(monkeypatch, fake, default_model="missing")
    ok, message = hook.test_connection()
    assert not ok and "missing" in message


def test_extra_fields_with_airflow_ui_prefix_are_read(monkeypatch, fake):
    monkeypatch.setenv(
        CONN_ENV,
        json.dumps(
            {
                "conn_type": "governed_ai_llm",
                "host": fake.base_url,
                "extra": {"extra__governed_ai_llm__default_model": "other-model"},
            }
        ),
    )
    assert LLMHook(llm_conn_id="test_llm").settings.default_model == "other-model"


def test_the_hook_hands_out_only_governed_clients_through_an_allowed_governance_connection(
    monkeypatch, fake, governance_policy
):
    from governed_ai.hooks.governance import GovernanceHook
    from tests.conftest import fake_context

    governance_policy(POLICY)
    hook = make_hook(monkeypatch, fake)
    with hook.governed_client(fake_context("hook_dag", "ask")) as client:
        client.chat(ChatRequest(messages=[{"role": "user", "content": "hi"}], model="fake-model"))
    (call,) = GovernanceHook().governor.audit.query(dag_id="hook_dag", action="model.call")
    assert call.outcome == "ok" and len(fake.chat_requests) == 1
    with pytest.raises(ConfigurationError, match="inside a task"):
        hook.get_conn()  # not in a running task: there is no task to govern the call for
    with pytest.raises(ConfigurationError, match="allowed_governance_conn_ids"):
        LLMHook(llm_conn_id="test_llm", governance_conn_id="lax_governance")
    assert len(fake.chat_requests) == 1


@pytest.mark.real_model
def test_real_local_model_structured_output(local_model_connection, client_for_connection):
    class Sentiment(BaseModel):
        sentiment: Literal["negative", "positive"]

    client = client_for_connection(POLICY)
    result = client.chat(
        ChatRequest(
            messages=[
                {"role": "system", "content": "Is the customer unhappy (negative) or happy (positive)?"},
                {"role": "user", "content": "Thanks, everything works great now!"},
            ],
            model="smollm2",
            output_schema=Sentiment,
            temperature=0.0,
            max_tokens=30,
        )
    ).result
    assert Sentiment.model_validate(result.output)
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert result.cost_usd > 0  # the local connection carries a nominal price
