"""Approval by policy in the core: the policy key, the engine's answer, and the gate in the one path.

Real PolicyProvider (inline YAML), BudgetLedger, AuditStore and journal on SQLite; model calls go to the
FaultyFakeOpenAIServer (a fake endpoint whose paid counter says what was served), tools are real functions
that count their calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from governed_ai.core.approval import APPROVAL_GRANTED, APPROVAL_REJECTED, APPROVAL_REQUESTED, record_answer
from governed_ai.core.chat import ChatRequest
from governed_ai.core.client import GovernedClient
from governed_ai.core.errors import ApprovalRequired, GovernanceDenied
from governed_ai.core.governor import Governor
from governed_ai.core.journal import ReplayJournal
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.llm_settings import LLMConnectionSettings
from governed_ai.core.policy import PolicyError, PolicyProvider, engine_from_text, load_policy_text
from governed_ai.core.pricing import PriceTable
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.core.tools import GovernedToolRunner, tool
from governed_ai.core.transport import ModelTransport
from tests.audit_support import keyed_audit_store
from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer

SUBJECT = Subject(dag_id="unit_dag", task_id="unit_task", run_id="run-1")
OTHER = Subject(dag_id="other_dag", task_id="unit_task", run_id="run-1")

POLICY = """
version: 1
rules:
  - name: unit-grants
    match: {dag_id: "*_dag"}
    models:
      - {connection: llm, model: "*"}
    tools:
      - name: "*"
    collections:
      - {name: "*", read: true, write: true}
  - name: frontier-needs-approval
    match: {dag_id: "unit_*"}
    require_approval:
      - {models: ["frontier-*"], approvers: [cfo], timeout_minutes: 30}
      - {estimated_cost_above_usd: 1.0, approvers: [finance, cfo]}
      - {tools: ["refund_*"], approvers: [support-lead]}
      - {collection_writes: ["prod_*"], approvers: [kb-owner]}
  - name: later-rule
    match: {dag_id: "unit_*"}
    require_approval:
      - {models: ["frontier-*"], approvers: [someone-else]}
"""
# frontier-* at $10 per 1M prompt and completion tokens; cheap-model at $1; unpriced-model has no price.
PRICES = PriceTable.from_mapping(
    {
        "frontier-*": {"input_per_1m_tokens": 10.0, "output_per_1m_tokens": 10.0},
        "cheap-model": {"input_per_1m_tokens": 1.0, "output_per_1m_tokens": 1.0},
    }
)


def bad(text: str) -> str:
    with pytest.raises(PolicyError) as error:
        load_policy_text("version: 1\nrules:\n  - name: r\n    require_approval:\n" + text)
    return str(error.value)


# -- the policy key ----------------------------------------------------------------------------------------


def test_require_approval_is_validated_strictly():
    document = load_policy_text(POLICY)
    first = document.rules[1].require_approval[0]
    assert (first.models, first.approvers, first.timeout_minutes) == (["frontier-*"], ["cfo"], 30)
    assert document.rules[1].require_approval[2].timeout_minutes == 60  # the default

    assert "one kind of action" in bad("      - {models: [a], tools: [b], approvers: [x]}\n")
    assert "model calls only" in bad("      - {tools: [b], estimated_cost_above_usd: 1.0, approvers: [x]}\n")
    assert "at least one approver" in bad("      - {tools: [b], approvers: []}\n")
    assert "needs models, tools" in bad("      - {approvers: [x]}\n")
    assert "approver" in bad("      - {tools: [b]}\n")  # approvers are required
    assert "timeout_minutes" in bad("      - {tools: [b], approvers: [x], timeout_minutes: 0}\n")
    assert "0 or more" in bad("      - {estimated_cost_above_usd: -1, approvers: [x]}\n")
    assert "expected a number" in bad('      - {estimated_cost_above_usd: "1", approvers: [x]}\n')
    assert "did you mean 'approvers'" in bad("      - {tools: [b], approvers: [x], approver: y}\n")


# -- the engine ----------------------------------------------------------------------------------------------


def test_the_engine_says_which_actions_need_approval_and_by_whom():
    engine = engine_from_text(POLICY)
    need = engine.approval_needed(SUBJECT, "model", "frontier-large", estimated_cost_usd=0.01)
    # The first applicable entry in file order names approvers and timeout, not the later rule's.
    assert need is not None and (need.rule, need.approvers, need.timeout_minutes) == (
        "frontier-needs-approval", ("cfo",), 30,
    )  # fmt: skip
    assert engine.approval_needed(SUBJECT, "model", "cheap-model", estimated_cost_usd=0.5) is None
    costly = engine.approval_needed(SUBJECT, "model", "cheap-model", estimated_cost_usd=1.5)
    assert costly is not None and costly.approvers == ("finance", "cfo") and costly.cost_threshold_usd == 1.0
    # No price, no estimate: a cost threshold cannot be shown to hold, so a human approves.
    assert engine.approval_needed(SUBJECT, "model", "unpriced-model", estimated_cost_usd=None) is not None
    assert engine.approval_needed(SUBJECT, "tool", "refund_order").approvers == ("support-lead",)  # type: ignore[union-attr]
    assert engine.approval_needed(SUBJECT, "tool", "lookup_order") is None
    assert engine.approval_needed(SUBJECT, "collection.write", "prod_kb") is not None
    assert engine.approval_needed(SUBJECT, "collection.write", "dev_kb") is None
    # A task the approval rules do not match needs none, although the granting rule matches it too.
    assert engine.approval_needed(OTHER, "model", "frontier-large", estimated_cost_usd=5.0) is None
    assert not engine.may_need_approval(OTHER, "model") and engine.may_need_approval(SUBJECT, "tool")


# -- the one path to a model -------------------------------------------------------------------------------


class Setup:
    def __init__(self, tmp_path: Path, server: FaultyFakeOpenAIServer) -> None:
        self.engine = create_store_engine(f"sqlite:///{tmp_path}/g.db")
        self.governor = Governor(
            policy=PolicyProvider(text=POLICY), ledger=BudgetLedger(self.engine),
            audit=keyed_audit_store(self.engine),
        )  # fmt: skip
        self.server = server

    def client(self, subject: Subject = SUBJECT, **options: Any) -> GovernedClient:
        settings = LLMConnectionSettings.model_validate(
            {"base_url": self.server.base_url, "api_key": "k", "max_retries": 0}
        )
        return GovernedClient(
            self.governor, ModelTransport(settings, connection_id="llm"), subject, connection_id="llm",
            prices=PRICES, **options,
        )  # fmt: skip

    def chat(self, model: str, subject: Subject = SUBJECT, max_tokens: int = 50, **options: Any) -> Any:
        with self.client(subject, **options) as client:
            return client.chat(
                ChatRequest(messages=[{"role": "user", "content": "[key=k1] hello"}], model=model,
                            max_tokens=max_tokens)
            )  # fmt: skip

    def paid(self) -> int:
        return sum(self.server.stats()["successes"].values())

    def records(self, action: str) -> list[Any]:
        return self.governor.audit.query(action=action, order="asc", limit=None)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    models = ("frontier-large", "cheap-model", "unpriced-model")
    with FaultyFakeOpenAIServer(FaultConfig(latency_ms=1, models=models)) as server:
        built = Setup(tmp_path, server)
        yield built
        built.engine.dispose()


def test_a_call_that_needs_approval_is_refused_before_anything_is_reserved_or_paid(setup: Setup):
    with pytest.raises(ApprovalRequired) as raised:
        setup.chat("frontier-large")
    needed = raised.value
    assert (needed.action, needed.resource, needed.rule, needed.approvers) == (
        "model", "llm/frontier-large", "frontier-needs-approval", ("cfo",),
    )  # fmt: skip
    assert needed.permanent and needed.estimated_cost_usd is not None and needed.estimated_cost_usd > 0
    assert setup.paid() == 0 and setup.server.stats()["chat_requests"] == 0
    assert setup.governor.ledger.status() == [] or all(
        s.reserved_tokens == 0 and s.spent_tokens == 0 for s in setup.governor.ledger.status()
    )
    (requested,) = setup.records(APPROVAL_REQUESTED)
    assert (requested.resource, requested.outcome, requested.extra["approvers"]) == (
        "llm/frontier-large", "pending", ["cfo"],
    )  # fmt: skip
    assert "hello" not in (requested.error or "") + str(requested.extra)  # no prompt text
    # A cheap call under the threshold needs nothing.
    assert setup.chat("cheap-model").result.content is not None and setup.paid() == 1


def test_an_approved_call_runs_once_and_a_retry_replays_it(setup: Setup):
    with pytest.raises(ApprovalRequired):
        setup.chat("frontier-large")
    record_answer(
        setup.governor, SUBJECT, action="model", resource="llm/frontier-large",
        rule="frontier-needs-approval", answer="approved", approver="cfo",
    )  # fmt: skip
    assert setup.chat("frontier-large").result.replayed_attempts == 0
    assert setup.paid() == 1
    # A later try of the same task instance (resumed execute, retry) pays nothing again.
    again = setup.chat("frontier-large", SUBJECT.model_copy(update={"try_number": 2}))
    assert again.replayed and setup.paid() == 1
    (granted,) = setup.records(APPROVAL_GRANTED)
    assert (granted.decision, granted.extra["approver"]) == ("allow", "cfo")
    # The approval is this task instance's: another run of the same task must ask again.
    with pytest.raises(ApprovalRequired):
        setup.chat("frontier-large", SUBJECT.model_copy(update={"run_id": "run-2"}))
    assert setup.paid() == 1
    assert setup.governor.audit.verify().ok


def test_a_rejection_is_an_audited_deny_and_grants_nothing(setup: Setup):
    record = record_answer(
        setup.governor, SUBJECT, action="model", resource="llm/frontier-large",
        rule="frontier-needs-approval", answer="rejected", approver="cfo",
    )  # fmt: skip
    assert (record.action, record.decision, record.outcome) == (APPROVAL_REJECTED, "deny", "rejected")
    assert "rejected by cfo" in (record.error or "")
    timed_out = record_answer(
        setup.governor, SUBJECT, action="tool", resource="refund_order", rule="r", answer="timed_out",
        approver=None,
    )  # fmt: skip
    assert timed_out.decision == "deny" and "not approved in time" in (timed_out.error or "")
    # "No" holds for the task instance: its next try is denied (audited) instead of asking again.
    with pytest.raises(GovernanceDenied, match="rejected .* earlier in this task instance"):
        setup.chat("frontier-large", SUBJECT.model_copy(update={"try_number": 2}))
    assert setup.records(APPROVAL_REJECTED)[-1].outcome == "rejected_before"
    # A new run asks again.
    with pytest.raises(ApprovalRequired):
        setup.chat("frontier-large", SUBJECT.model_copy(update={"run_id": "run-2"}))
    assert setup.paid() == 0


def test_a_denied_model_stays_denied_it_is_never_offered_for_approval(tmp_path: Path, setup: Setup):
    setup.governor.policy = PolicyProvider(text=POLICY.replace('model: "*"', "model: cheap-model"))
    with pytest.raises(GovernanceDenied):
        setup.chat("frontier-large")
    assert setup.records(APPROVAL_REQUESTED) == []


def test_an_unpriced_model_under_a_cost_threshold_needs_approval(setup: Setup):
    with pytest.raises(ApprovalRequired) as raised:
        setup.chat("unpriced-model")
    assert raised.value.estimated_cost_usd is None and raised.value.approvers == ("finance", "cfo")
    assert setup.paid() == 0


def test_a_try_resumed_after_approval_replays_what_it_paid_before_it_waited(setup: Setup):
    # One try (waiting for a person starts no new one): a cheap call, then one that needs approval.
    setup.chat("cheap-model")
    with pytest.raises(ApprovalRequired):
        setup.chat("frontier-large")
    record_answer(
        setup.governor, SUBJECT, action="model", resource="llm/frontier-large",
        rule="frontier-needs-approval", answer="approved", approver="cfo",
    )  # fmt: skip
    # The resumed execute runs everything again: the cheap call comes from the journal, not the endpoint.
    assert setup.chat("cheap-model", replay_current_try=True).replayed
    assert not setup.chat("frontier-large", replay_current_try=True).replayed
    assert setup.paid() == 2
    # Without the resume marker the same try asks again (a repeated question within one try is asked).
    assert not setup.chat("cheap-model").replayed and setup.paid() == 3


# -- tools ---------------------------------------------------------------------------------------------------


class RefundArgs(BaseModel):
    order_id: str


def test_a_tool_that_needs_approval_does_not_run_until_approved(setup: Setup):
    ran: list[str] = []

    @tool(register=False, description="Refund an order.", side_effects=True)
    def refund_order(args: RefundArgs) -> str:
        ran.append(args.order_id)
        return "refunded"

    def runner() -> GovernedToolRunner:
        journal = ReplayJournal(setup.engine, "tool")
        return GovernedToolRunner(setup.governor, SUBJECT, [refund_order], journal)

    with pytest.raises(ApprovalRequired) as raised:
        runner().call("refund_order", {"order_id": "AB123456"})
    assert raised.value.action == "tool" and raised.value.approvers == ("support-lead",) and ran == []
    record_answer(
        setup.governor, SUBJECT, action="tool", resource="refund_order", rule=raised.value.rule,
        answer="approved", approver="support-lead",
    )  # fmt: skip
    assert runner().call("refund_order", {"order_id": "AB123456"}).result == "refunded"
    assert ran == ["AB123456"]
    # The resumed execute runs the call again: the journal replays it, the refund is not paid twice.
    assert runner().call("refund_order", {"order_id": "AB123456"}).replayed and ran == ["AB123456"]
