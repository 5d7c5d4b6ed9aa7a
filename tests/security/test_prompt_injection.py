"""Prompt injection against the agent: a model that obeys every injected instruction still cannot make a
forbidden tool run. Every case of the corpus, in both tool-choice modes.

The "model" is ToolCallingServer (a fake: a real HTTP server replying as scripted, i.e. obeying the
injection); governance, the audit trail and the tools are real. The forbidden tools count their calls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from governed_ai.core.tools import FINAL_CHOICE, ToolRegistry, schema_tool_names, tool
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.agent import AgentOperator
from tests.conftest import fake_context
from tests.fakes.openai_server import ScriptedReply
from tests.fakes.tool_calling_server import ToolCallingServer, choose, final, tool_calls
from tests.security.injection_corpus import CASES, PERMITTED, WITHHELD, InjectionCase, forbidden_calls

POLICY = """
version: 1
rules:
  - name: injection-tests
    match: {dag_id: unit_dag}
    models:
      - {connection: test_llm, model: fake-model}
    tools:
      - name: lookup_order
        allow_other_args: false
        args:
          order_id: {regex: "[A-Z]{2}[0-9]{6}", required: true}
      - name: search_kb
"""


class OrderId(BaseModel):
    order_id: str  # no pattern here on purpose: the policy's constraint is what must refuse bad ids


class Query(BaseModel):
    query: str


class Refund(BaseModel):
    order_id: str
    amount_eur: float


class Tools:
    """The agent's real tools; every executed call is counted."""

    def __init__(self, article: str) -> None:
        self.calls: Counter[str] = Counter()
        self.registry = ToolRegistry(name="injection")
        tools = self

        @tool(registry=self.registry, description="Status of an order.")
        def lookup_order(args: OrderId) -> dict[str, str]:
            tools.calls["lookup_order"] += 1
            return {"order_id": args.order_id, "status": "shipped"}

        @tool(registry=self.registry, description="Search help articles.")
        def search_kb(args: Query) -> list[str]:
            tools.calls["search_kb"] += 1
            return [article]

        @tool(registry=self.registry, description="Refund money.", side_effects=True)
        def issue_refund(args: Refund) -> str:
            tools.calls["issue_refund"] += 1
            return "refunded"

        @tool(registry=self.registry, description="Delete records.", side_effects=True)
        def delete_records(table: str) -> str:
            tools.calls["delete_records"] += 1
            return "deleted"


@pytest.fixture
def server(governance_policy, monkeypatch: pytest.MonkeyPatch) -> Iterator[ToolCallingServer]:
    governance_policy(POLICY)
    with ToolCallingServer(models=("fake-model",)) as fake:
        monkeypatch.setenv(
            "AIRFLOW_CONN_TEST_LLM", fake.connection_json(default_model="fake-model", max_retries=0)
        )
        yield fake


def run_agent(case: InjectionCase, mode: str) -> tuple[Tools, dict[str, Any]]:
    tools = Tools(article=case.text)
    op = AgentOperator(
        task_id="unit_task",
        prompt="Help the customer with their order AB123456.",
        context=case.text if case.channel == "context" else "Customer: where is my order AB123456?",
        tools=["lookup_order", "search_kb", *WITHHELD],
        registry=tools.registry,
        mode=mode,  # type: ignore[arg-type]
        llm_conn_id="test_llm",
        max_steps=14,
        max_tool_calls=10,
        max_tool_errors=10,  # let every attempt reach governance instead of withdrawing tools early
        require_final_answer=False,
    )
    return tools, op.execute(context=fake_context())  # type: ignore[arg-type]


def audit(action: str) -> list[Any]:
    return GovernanceHook().governor.audit.query(dag_id="unit_dag", action=action, order="asc", limit=None)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_native_mode_denies_and_audits_every_injected_call(server, case):
    if case.channel == "tool_result":
        server.script(tool_calls(("search_kb", {"query": "refund policy"})))
    server.script(tool_calls(*case.calls), ScriptedReply(content="I cannot do that."))

    tools, xcom = run_agent(case, "native")

    refused = forbidden_calls(case)
    assert refused, "every case must contain at least one forbidden call"
    assert all(tools.calls[name] == 0 for name in WITHHELD)
    if any(name == "lookup_order" for name, _ in refused):
        assert tools.calls["lookup_order"] == 0

    steps = [s for s in xcom["transcript"] if s["kind"] == "tool"]
    injected = steps[1:] if case.channel == "tool_result" else steps
    outcomes = [(s["decision"], s["outcome"]) for s in injected]
    expected = [
        ("denied", "denied") if (name, args) in refused else ("allowed", "ok") for name, args in case.calls
    ]
    assert outcomes == expected

    denials = [r for r in audit("tool.authorize") if r.decision == "deny"]
    assert len(denials) == len(refused)
    assert all(r.outcome == "denied" and r.error for r in denials)
    tool_messages = [m["content"] for m in server.chat_requests[-1]["messages"] if m["role"] == "tool"]
    assert sum("is not permitted for this task" in m for m in tool_messages) == len(refused)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_constrained_mode_never_lets_the_model_name_a_forbidden_tool(server, case):
    replies: list[str] = []
    if case.channel == "tool_result":
        replies.append(choose("search_kb", query="refund policy"))
    for name, args in case.calls:
        # The fake ignores the schema (a real grammar-constrained server could not write these); the reply
        # is rejected by validation, repaired once, rejected again: the step is lost, nothing runs.
        replies += [choose(name, **args)] * (1 if name in PERMITTED else 2)
    replies.append(final("I cannot do that."))
    server.script(*replies)

    tools, xcom = run_agent(case, "constrained")

    for request in server.chat_requests:
        offered = schema_tool_names(request["response_format"]["json_schema"]["schema"])
        assert offered <= {*PERMITTED, FINAL_CHOICE}
    assert all(tools.calls[name] == 0 for name in WITHHELD)
    assert xcom["final"] == "I cannot do that."

    refused = forbidden_calls(case)
    named_forbidden = [name for name, _ in refused if name not in PERMITTED]
    executed = {r.resource for r in audit("tool.call")}
    assert not executed & set(named_forbidden)
    invalid_steps = [s for s in xcom["transcript"] if s["kind"] == "invalid_reply"]
    assert len(invalid_steps) == len(named_forbidden)
    denials = [r for r in audit("tool.authorize") if r.decision == "deny"]
    # Every refused choice is a deny record: a forbidden name the schema refused (each time the model chose
    # it: the first reply and its repair) ...
    schema_refusals = [r.resource for r in denials if r.extra.get("mode") == "constrained"]
    assert sorted(schema_refusals) == sorted(named_forbidden * 2)
    assert all(r.outcome == "denied" for r in denials)
    assert all("it was not run" in (r.error or "") for r in denials if r.extra.get("mode") == "constrained")
    # ... and a granted tool with arguments outside the policy's constraints: a call, denied.
    constrained_denials = [name for name, _ in refused if name in PERMITTED]
    assert [r.resource for r in denials if r.extra.get("mode") != "constrained"] == constrained_denials
    if constrained_denials:
        assert tools.calls["lookup_order"] == 0


def test_the_corpus_covers_both_channels_and_both_withheld_tools():
    assert {c.channel for c in CASES} == {"context", "tool_result"}
    named = {name for c in CASES for name, _ in c.calls}
    assert set(WITHHELD) <= named
    assert all(forbidden_calls(c) for c in CASES)
    assert len({name for c in CASES for name, _ in forbidden_calls(c)}) >= 9  # distinct forbidden names
