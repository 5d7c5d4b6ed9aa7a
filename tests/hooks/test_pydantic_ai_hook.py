"""Entry points for code the provider does not write: the hooks' governed openai clients and the
governed_ai_pydanticai connection type common-ai's operators resolve (FakeOpenAIServer, a named fake model
server over real HTTP; the real hooks, policy and store)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

pytest.importorskip("airflow.providers.common.ai")

from airflow.providers.common.ai.hooks.pydantic_ai import PydanticAIHook

from governed_ai.core.errors import ConfigurationError
from governed_ai.core.openai_gateway import close_open_gateways
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.hooks.llm import LLMHook
from governed_ai.hooks.pydantic_ai import GovernedPydanticAIHook
from tests.conftest import fake_context
from tests.fakes.openai_server import FakeOpenAIServer

POLICY = """
version: 1
rules:
  - name: callers
    match: {dag_id: "callers_*"}
    models:
      - {connection: callers_llm, model: fake-model}
"""
GOVERNED_ENV = "AIRFLOW_CONN_CALLERS_PYDANTIC"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, governance_policy) -> Iterator[FakeOpenAIServer]:
    governance_policy(POLICY)
    with FakeOpenAIServer(models=("fake-model",)) as server:
        monkeypatch.setenv("AIRFLOW_CONN_CALLERS_LLM", server.connection_json(default_model="fake-model"))
        yield server
    close_open_gateways()


def governed_connection(monkeypatch: pytest.MonkeyPatch, **extra: object) -> None:
    extra.setdefault("llm_conn_id", "callers_llm")
    monkeypatch.setenv(GOVERNED_ENV, json.dumps({"conn_type": "governed_ai_pydanticai", "extra": extra}))


def test_the_llm_hooks_openai_clients_are_governed_calls_of_the_task(fake) -> None:
    context = fake_context("callers_dag", "sdk_task")
    with LLMHook(llm_conn_id="callers_llm").openai_client(context) as client:
        reply = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )

    async def ask_async() -> str | None:
        async with LLMHook(llm_conn_id="callers_llm").async_openai_client(context) as client:
            answer = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "hello"}]
            )
        return answer.choices[0].message.content

    assert reply.choices[0].message.content == "ok" and asyncio.run(ask_async()) == "ok"
    calls = GovernanceHook().governor.audit.query(dag_id="callers_dag", action="model.call", limit=None)
    assert [(c.task_id, c.resource) for c in calls] == [("sdk_task", "callers_llm/fake-model")] * 2
    assert len(fake.chat_requests) == 2


def test_common_ai_resolves_the_governed_hook_from_the_connection_type(fake, monkeypatch) -> None:
    governed_connection(monkeypatch, model="openai:fake-model")

    hook = PydanticAIHook.get_hook(
        "callers_pydantic", hook_params={"model_id": None, "fallback_conn_ids": None}
    )

    assert isinstance(hook, GovernedPydanticAIHook)
    model = hook.governed_model(fake_context("callers_dag", "agent_task"))
    assert model.model_name == "fake-model"
    ok, message = hook.test_connection()
    assert ok and "callers_llm" in message and fake.chat_requests == []  # the test spends no tokens


def test_fallback_chains_are_refused_they_could_reach_an_ungoverned_model(fake, monkeypatch) -> None:
    governed_connection(monkeypatch, fallback_conn_ids=["pydanticai_default"])
    with pytest.raises(ConfigurationError, match="model_routes"):
        GovernedPydanticAIHook("callers_pydantic").governed_model(fake_context("callers_dag"))

    governed_connection(monkeypatch)
    hook = GovernedPydanticAIHook("callers_pydantic", fallback_conn_ids=["openai_direct"])
    with pytest.raises(ConfigurationError, match="ungoverned"):
        hook.governed_model(fake_context("callers_dag"))


def test_a_governance_connection_the_deployment_does_not_allow_is_refused(fake, monkeypatch) -> None:
    governed_connection(monkeypatch, governance_conn_id="lax_governance")
    with pytest.raises(ConfigurationError, match="allowed_governance_conn_ids"):
        GovernedPydanticAIHook("callers_pydantic").governed_model(fake_context("callers_dag"))
    assert fake.chat_requests == []


def test_outside_a_running_task_there_is_no_model(fake, monkeypatch) -> None:
    governed_connection(monkeypatch)
    with pytest.raises(ConfigurationError, match="running tasks only"):
        GovernedPydanticAIHook("callers_pydantic").get_conn()
