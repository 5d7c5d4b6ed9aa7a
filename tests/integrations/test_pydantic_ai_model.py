"""A real pydantic-ai Agent on the governed model: tool calls, structured output, refusals, replays.

The endpoint is ToolCallingServer (a named fake model with scripted replies and tool calls) over real
HTTP; pydantic-ai, the openai SDK and the governed client are the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import BaseModel

pytest.importorskip("pydantic_ai")

from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelHTTPError

from governed_ai.core.audit import StoredAuditRecord
from governed_ai.core.client import GovernedClient
from governed_ai.core.errors import ConfigurationError
from governed_ai.core.governor import Governor
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.llm_settings import LLMConnectionSettings
from governed_ai.core.openai_gateway import close_open_gateways
from governed_ai.core.policy import PolicyProvider
from governed_ai.core.pricing import PriceTable
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.core.transport import ModelTransport
from governed_ai.integrations.pydantic_ai import governed_chat_model
from tests.audit_support import keyed_audit_store
from tests.fakes.openai_server import ScriptedReply
from tests.fakes.tool_calling_server import ToolCallingServer, tool_calls

SUBJECT = Subject(dag_id="agent_dag", task_id="agent_task", run_id="run-1")
EMAIL = "canary.person@example.com"
POLICY = """
version: 1
defaults: {redact_prompts: true, redact_outputs: true}
rules:
  - name: agent-rule
    match: {dag_id: "agent_*"}
    models:
      - {connection: llm, model: fake-model}
    model_routes:
      default: {model: fake-model}
"""


class Order(BaseModel):
    order_id: str
    status: str


@dataclass
class Setup:
    governor: Governor
    server: ToolCallingServer

    def client(self, subject: Subject = SUBJECT) -> GovernedClient:
        settings = LLMConnectionSettings.model_validate(
            {
                "base_url": self.server.base_url,
                "api_key": "k",
                "max_retries": 0,
                "default_model": "fake-model",
            }
        )
        return GovernedClient(
            self.governor,
            ModelTransport(settings, connection_id="llm"),
            subject,
            connection_id="llm",
            prices=PriceTable(),
            default_model="fake-model",
        )

    def records(self, action: str) -> list[StoredAuditRecord]:
        return self.governor.audit.query(action=action, order="asc", limit=None)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    engine = create_store_engine(f"sqlite:///{tmp_path}/g.db")
    server = ToolCallingServer(models=("fake-model",)).__enter__()
    governor = Governor(
        policy=PolicyProvider(text=POLICY), ledger=BudgetLedger(engine), audit=keyed_audit_store(engine)
    )
    yield Setup(governor, server)
    close_open_gateways()
    server.__exit__()
    engine.dispose()


def order_agent(setup: Setup, subject: Subject = SUBJECT, calls: list[str] | None = None) -> Agent[None, str]:
    agent = Agent(governed_chat_model(setup.client(subject), "default"), instructions="Help with orders.")

    @agent.tool_plain
    def order_status(order_id: str) -> str:
        """The status of an order."""
        if calls is not None:
            calls.append(order_id)
        return f"order {order_id} shipped"

    return agent


def test_an_agent_with_a_tool_runs_governed_end_to_end(setup: Setup) -> None:
    setup.server.script(tool_calls(("order_status", {"order_id": "A-17"})), "Order A-17 has shipped.")
    called: list[str] = []

    result = order_agent(setup, calls=called).run_sync(f"Where is order A-17? I am {EMAIL}")

    assert result.output == "Order A-17 has shipped."
    assert called == ["A-17"]
    assert setup.server.tools_offered() == [["order_status"], ["order_status"]]
    first, second = setup.server.chat_requests
    assert first["model"] == "fake-model"  # the route 'default', resolved by the policy
    assert EMAIL not in str(first) and EMAIL not in str(second)  # redacted before it left
    assert any(m.get("role") == "tool" and "shipped" in str(m.get("content")) for m in second["messages"])
    calls = setup.records("model.call")
    assert [(c.decision, c.rule, c.model) for c in calls] == [("allow", "agent-rule", "fake-model")] * 2
    assert result.usage().requests == 2
    assert result.usage().input_tokens == sum(c.prompt_tokens or 0 for c in calls)


def test_structured_output_through_the_output_tool(setup: Setup) -> None:
    setup.server.script(tool_calls(("final_result", {"order_id": "A-17", "status": "shipped"})))
    agent = Agent(governed_chat_model(setup.client()), output_type=Order, instructions="Report the order.")

    assert agent.run_sync("Order A-17?").output == Order(order_id="A-17", status="shipped")
    assert len(setup.records("model.call")) == 1


def test_a_retried_agent_replays_its_paid_steps(setup: Setup) -> None:
    setup.server.script(tool_calls(("order_status", {"order_id": "A-17"})), "Order A-17 has shipped.")
    first = order_agent(setup).run_sync("Where is order A-17?").output
    paid = len(setup.server.chat_requests)

    second_try = SUBJECT.model_copy(update={"try_number": 2})
    setup.server.script(ScriptedReply(content="a different answer that must not be paid for"))
    again = order_agent(setup, second_try).run_sync("Where is order A-17?").output

    assert (paid, again) == (2, first)
    assert len(setup.server.chat_requests) == paid  # nothing new reached the server
    assert len(setup.records("model.replay")) == 2


def test_a_denied_model_fails_the_agent_with_the_policys_message(setup: Setup) -> None:
    agent = Agent(governed_chat_model(setup.client(), "gpt-4o"), instructions="x")

    with pytest.raises(ModelHTTPError) as denied:
        agent.run_sync("hello")

    assert denied.value.status_code == 403 and "'gpt-4o'" in str(denied.value.body)
    assert setup.server.chat_requests == []
    (deny,) = setup.records("model.authorize")
    assert deny.decision == "deny"


def test_streaming_is_refused_not_passed_through(setup: Setup) -> None:
    agent = Agent(governed_chat_model(setup.client()), instructions="x")

    async def stream() -> None:
        async with agent.run_stream("hello") as run:
            await run.get_output()

    import asyncio

    with pytest.raises(ModelHTTPError) as refused:
        asyncio.run(stream())
    assert refused.value.status_code == 400 and "stream=True" in str(refused.value.body)
    assert setup.server.chat_requests == []


def test_model_names_openai_prefix_accepted_other_providers_refused(setup: Setup) -> None:
    assert governed_chat_model(setup.client(), "openai:fake-model").model_name == "fake-model"
    assert governed_chat_model(setup.client()).model_name == "fake-model"  # the connection's default
    with pytest.raises(ConfigurationError, match="anthropic"):
        governed_chat_model(setup.client(), "anthropic:claude-sonnet")
