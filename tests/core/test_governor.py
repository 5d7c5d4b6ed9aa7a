"""Governor: policy, budget ledger, audit trail and redaction around one model call.

Real PolicyProvider (inline YAML), real BudgetLedger and AuditStore on a SQLite file; only the model call
itself is a fake (``FakeCall``), which records every request it receives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import Engine

from governed_ai.core.audit import AuditStore, StoredAuditRecord
from governed_ai.core.chat import ChatRequest, ChatResult, Usage
from governed_ai.core.governor import GovernanceDenied, GovernedChatResult, Governor, ModelUnavailable
from governed_ai.core.ledger import BudgetLedger, BudgetStatus, ReservationState, budget_reservations_table
from governed_ai.core.policy import PolicyProvider
from governed_ai.core.pricing import PriceTable
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.structured_output import StructuredOutputError
from governed_ai.core.subject import Subject
from tests.audit_support import keyed_audit_store

CONN = "llm"
SUBJECT = Subject(dag_id="unit_dag", task_id="unit_task", run_id="run-1")
PRICES = PriceTable.from_mapping({"*": {"input_per_1m_tokens": 1.0, "output_per_1m_tokens": 2.0}})
EMAIL = "alice@example.com"
CARD = "4111 1111 1111 1111"  # Luhn-valid test card number
TICKET = "TKT-0123456789abcdef"

RULES = """
rules:
  - name: unit-rule
    match: {dag_id: "unit_*"}
    models:
      - {connection: llm, model: primary}
      - {connection: llm, model: backup}
      - {connection: llm, model: capped, max_tokens_per_call: 64}
    model_routes:
      default: {model: primary, fallbacks: [backup]}
    redaction:
      custom_patterns: [{name: ticket_secret, regex: "TKT-[0-9a-f]{16}"}]
"""


def policy_text(
    *, store_content: bool = False, redact_prompts: bool = True, redact_outputs: bool = True, budget: str = ""
) -> str:
    defaults = (
        "defaults:\n"
        f"  store_content: {str(store_content).lower()}\n"
        f"  redact_prompts: {str(redact_prompts).lower()}\n"
        f"  redact_outputs: {str(redact_outputs).lower()}\n"
    )
    return "version: 1\n" + defaults + RULES + budget


def budget_yaml(max_tokens: int) -> str:
    return (
        "budgets:\n"
        "  - name: unit-budget\n"
        "    scope: dag\n"
        '    match: {dag_id: "unit_*"}\n'
        "    period: run\n"
        f"    max_tokens: {max_tokens}\n"
    )


@dataclass
class FakeCall:
    """Stands in for the model endpoint: records requests, then raises or replies as scripted."""

    content: str = "fine"
    output: dict[str, object] | None = None
    prompt_tokens: int = 11
    completion_tokens: int = 7
    failures: dict[str, BaseException] = field(default_factory=dict)
    requests: list[ChatRequest] = field(default_factory=list)

    def __call__(self, request: ChatRequest) -> ChatResult:
        self.requests.append(request)
        failure = self.failures.get(request.model)
        if failure is not None:
            raise failure
        return ChatResult(
            content=self.content,
            output=self.output,
            model=request.model,
            usage=Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens),
            cost_usd=PRICES.cost(request.model, self.prompt_tokens, self.completion_tokens),
            latency_ms=3.0,
            attempts=1,
        )

    def sent_text(self) -> str:
        return "\n".join(str(m.get("content")) for r in self.requests for m in r.messages)


@dataclass
class Setup:
    governor: Governor
    ledger: BudgetLedger
    audit: AuditStore
    engine: Engine

    def records(self, action: str) -> list[StoredAuditRecord]:
        return self.audit.query(action=action, order="asc", limit=None)

    def budget(self) -> BudgetStatus:
        (status,) = self.ledger.status()
        return status


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Setup]]:
    engine = create_store_engine(f"sqlite:///{tmp_path}/g.db")

    def build(text: str | None = None, mask: Callable[[str], str] | None = None) -> Setup:
        ledger, audit = BudgetLedger(engine), keyed_audit_store(engine)
        provider = PolicyProvider(text=text if text is not None else policy_text())
        governor = Governor(policy=provider, ledger=ledger, audit=audit)
        if mask is not None:
            governor.mask = mask
        return Setup(governor, ledger, audit, engine)

    yield build
    engine.dispose()


def chat(
    setup: Setup,
    call: FakeCall,
    *,
    model: str = "primary",
    content: str = "hello",
    max_tokens: int | None = 50,
) -> GovernedChatResult:
    request = ChatRequest(messages=[{"role": "user", "content": content}], model=model, max_tokens=max_tokens)
    return setup.governor.chat(
        SUBJECT,
        connection_id=CONN,
        requested_model=model,
        request=request,
        call=call,
        prices=PRICES,
        prompt_version="v1",
    )


# -- authorization ---------------------------------------------------------------------------------------


def test_allowed_call_is_authorized_called_and_audited(make):
    setup, call = make(), FakeCall()

    governed = chat(setup, call)

    assert [r.model for r in call.requests] == ["primary"]
    assert governed.result.content == "fine"
    assert governed.rule == "unit-rule" and governed.prompt_version == "v1"
    assert governed.fallbacks_tried == ()
    (auth,) = setup.records("model.authorize")
    assert (auth.decision, auth.rule, auth.model, auth.outcome) == ("allow", "unit-rule", "primary", "ok")
    assert (auth.dag_id, auth.task_id, auth.run_id) == ("unit_dag", "unit_task", "run-1")
    (done,) = setup.records("model.call")
    assert (done.decision, done.outcome, done.resource) == ("allow", "ok", "llm/primary")
    assert (done.prompt_tokens, done.completion_tokens) == (11, 7)
    assert done.cost_usd == pytest.approx(PRICES.cost("primary", 11, 7))
    assert done.prompt_version == "v1"
    assert done.error is None


def test_denied_model_raises_is_audited_and_never_called(make):
    setup, call = make(), FakeCall()

    with pytest.raises(GovernanceDenied) as denied:
        chat(setup, call, model="forbidden")

    assert denied.value.action == "model"
    assert "'forbidden'" in str(denied.value)
    assert call.requests == []
    (auth,) = setup.records("model.authorize")
    assert (auth.decision, auth.outcome, auth.model) == ("deny", "denied", "forbidden")
    assert auth.error is not None and "denied model 'forbidden'" in auth.error
    assert setup.records("model.call") == []


def test_route_alias_falls_back_when_the_first_model_is_unavailable(make):
    setup = make(policy_text(budget=budget_yaml(100_000)))
    call = FakeCall(failures={"primary": ModelUnavailable("primary is down")})

    governed = chat(setup, call, model="default")

    assert [r.model for r in call.requests] == ["primary", "backup"]
    assert governed.fallbacks_tried == ("primary",)
    assert governed.result.model == "backup"
    calls = setup.records("model.call")
    assert [(r.model, r.outcome) for r in calls] == [("primary", "error"), ("backup", "ok")]
    assert calls[0].error is not None and "primary is down" in calls[0].error
    assert [r.model for r in setup.records("model.authorize")] == ["primary", "backup"]
    # The failed attempt's hold was released; only the successful call is charged.
    assert (setup.budget().spent_tokens, setup.budget().reserved_tokens) == (18, 0)


def test_last_fallback_unavailable_raises(make):
    setup = make()
    call = FakeCall(failures={m: ModelUnavailable(f"{m} down") for m in ("primary", "backup")})

    with pytest.raises(ModelUnavailable, match="backup down"):
        chat(setup, call, model="default")

    assert [r.outcome for r in setup.records("model.call")] == ["error", "error"]


@pytest.mark.parametrize(("requested", "sent"), [(None, 64), (1000, 64), (10, 10)])
def test_max_tokens_per_call_caps_the_request(make, requested, sent):
    setup, call = make(), FakeCall()

    chat(setup, call, model="capped", max_tokens=requested)

    assert call.requests[0].max_tokens == sent


# -- budgets ---------------------------------------------------------------------------------------------


def test_reservation_is_settled_with_actual_usage(make):
    setup, call = (
        make(policy_text(budget=budget_yaml(10_000))),
        FakeCall(prompt_tokens=20, completion_tokens=5),
    )

    chat(setup, call)

    status = setup.budget()
    assert (status.budget, status.period) == ("unit-budget", "run-1")
    assert (status.spent_tokens, status.reserved_tokens) == (25, 0)
    assert status.spent_cost_usd == pytest.approx(PRICES.cost("primary", 20, 5))
    assert status.remaining_tokens == 10_000 - 25


def test_budget_exhaustion_denies_audits_and_does_not_call(make):
    # A call reserves 60 tokens (50 completion + a 10-token prompt estimate) and actually spends 60.
    setup, call = make(policy_text(budget=budget_yaml(100))), FakeCall(prompt_tokens=40, completion_tokens=20)
    chat(setup, call)
    assert len(call.requests) == 1

    with pytest.raises(GovernanceDenied) as denied:
        chat(setup, call)

    assert denied.value.rule == "unit-budget"
    assert "unit-budget" in str(denied.value)
    assert len(call.requests) == 1
    (budget_deny,) = setup.records("budget.deny")
    assert (budget_deny.decision, budget_deny.rule, budget_deny.outcome) == ("deny", "unit-budget", "denied")
    assert budget_deny.resource == "llm/primary"
    assert (setup.budget().spent_tokens, setup.budget().reserved_tokens) == (60, 0)


def test_structured_output_error_still_charges_the_budget(make):
    setup = make(policy_text(budget=budget_yaml(10_000)))
    failure = StructuredOutputError("reply did not fit", prompt_tokens=30, completion_tokens=12)
    call = FakeCall(failures={"primary": failure})

    with pytest.raises(StructuredOutputError):
        chat(setup, call)

    assert (setup.budget().spent_tokens, setup.budget().reserved_tokens) == (42, 0)
    (record,) = setup.records("model.call")
    assert (record.outcome, record.prompt_tokens, record.completion_tokens) == ("error", 30, 12)
    assert record.error is not None and record.error.startswith("StructuredOutputError")


def test_other_exception_releases_the_reservation(make):
    setup = make(policy_text(budget=budget_yaml(10_000)))
    call = FakeCall(failures={"primary": RuntimeError(f"connection reset while mailing {EMAIL}")})

    with pytest.raises(RuntimeError, match="connection reset"):
        chat(setup, call)

    assert (setup.budget().spent_tokens, setup.budget().reserved_tokens) == (0, 0)
    with setup.engine.connect() as connection:  # the hold itself, not only the totals
        states = connection.execute(budget_reservations_table.select()).mappings().all()
    assert [row["state"] for row in states] == [ReservationState.RELEASED.value]
    (record,) = setup.records("model.call")
    assert record.outcome == "error"
    assert record.error is not None and "RuntimeError" in record.error
    assert EMAIL not in record.error  # error text is redacted before it is audited


# -- redaction -------------------------------------------------------------------------------------------


def test_prompt_pii_never_reaches_the_model(make):
    setup, call = make(), FakeCall()

    governed = chat(setup, call, content=f"Customer {EMAIL} paid with {CARD}.")

    sent = call.sent_text()
    assert EMAIL not in sent and CARD not in sent
    assert "[REDACTED:EMAIL]" in sent and "[REDACTED:PAYMENT_CARD]" in sent
    assert governed.redactions == 2


def test_prompt_is_sent_as_is_when_prompt_redaction_is_off(make):
    setup, call = make(policy_text(redact_prompts=False)), FakeCall()

    chat(setup, call, content=f"Customer {EMAIL}")

    assert EMAIL in call.sent_text()


def test_output_is_redacted_in_the_returned_result(make):
    setup, call = make(), FakeCall(content=f"Write to {EMAIL}", output={"contact": EMAIL})

    governed = chat(setup, call)

    assert governed.result.content == "Write to [REDACTED:EMAIL]"
    assert governed.result.output == {"contact": "[REDACTED:EMAIL]"}
    assert EMAIL not in str(governed.to_xcom())
    assert governed.redactions == 2


def test_custom_policy_pattern_is_redacted(make):
    setup, call = make(), FakeCall()

    chat(setup, call, content=f"ticket {TICKET}")

    assert TICKET not in call.sent_text()
    assert "[REDACTED:TICKET_SECRET]" in call.sent_text()


def test_mask_callable_is_applied_to_prompt_and_output(make):
    setup = make(mask=lambda text: text.replace("hunter2", "***"))
    call = FakeCall(content="the password is hunter2")

    governed = chat(setup, call, content="log in with hunter2")

    assert "hunter2" not in call.sent_text() and "log in with ***" in call.sent_text()
    assert governed.result.content == "the password is ***"


def test_audit_content_is_not_stored_by_default(make):
    setup, call = make(policy_text(store_content=False)), FakeCall()

    chat(setup, call, content=f"from {EMAIL}")

    (record,) = setup.records("model.call")
    assert record.content is None


def test_audit_content_is_stored_redacted_when_enabled(make):
    setup, call = make(policy_text(store_content=True)), FakeCall(content=f"reply to {EMAIL}")

    chat(setup, call, content=f"from {EMAIL} card {CARD}")

    (record,) = setup.records("model.call")
    assert record.content is not None
    assert "[user] from [REDACTED:EMAIL] card [REDACTED:PAYMENT_CARD]" in record.content
    assert "[assistant] reply to [REDACTED:EMAIL]" in record.content
    assert EMAIL not in record.content and CARD not in record.content


def test_audit_content_is_redacted_even_when_prompt_and_output_redaction_are_off(make):
    setup = make(policy_text(store_content=True, redact_prompts=False, redact_outputs=False))
    call = FakeCall(content=f"reply to {EMAIL}")

    chat(setup, call, content=f"from {EMAIL}")

    (record,) = setup.records("model.call")
    assert record.content is not None and "[user]" in record.content
    assert EMAIL not in record.content


# -- fail-closed and audit integrity ---------------------------------------------------------------------


def test_policy_that_fails_to_load_denies_everything(make):
    setup, call = make("version: 2\nrules: []\n"), FakeCall()

    with pytest.raises(GovernanceDenied, match="failed to load"):
        chat(setup, call)

    assert call.requests == []
    (auth,) = setup.records("model.authorize")
    assert auth.decision == "deny"
    assert auth.error is not None and "version" in auth.error


def test_audit_chain_verifies_after_a_mix_of_calls(make):
    setup = make(policy_text(budget=budget_yaml(150)))
    ok_call = FakeCall(prompt_tokens=40, completion_tokens=20)
    chat(setup, ok_call)  # allow + ok
    with pytest.raises(GovernanceDenied):
        chat(setup, ok_call, model="forbidden")  # model deny
    with pytest.raises(RuntimeError):
        chat(setup, FakeCall(failures={"primary": RuntimeError("boom")}))  # allow + error
    chat(setup, ok_call)  # allow + ok
    with pytest.raises(GovernanceDenied):
        chat(setup, ok_call)  # allow + budget deny

    verification = setup.audit.verify()

    assert verification.ok, verification.problem
    actions = [r.action for r in setup.audit.query(limit=None, order="asc")]
    assert actions.count("model.authorize") == 5
    assert actions.count("model.call") == 3
    assert actions.count("budget.deny") == 1
    assert verification.records_checked == len(actions) == 9


def test_denial_reasons_quoting_argument_values_are_redacted(make):
    tools = RULES + "    tools:\n      - name: refund\n        args:\n          note: {regex: \"[a-z]+\"}\n"
    setup = make("version: 1\n" + tools)
    engine = setup.governor.engine()
    decision = engine.authorize_tool(SUBJECT, "refund", {"note": f"card {CARD} mail {EMAIL}"})
    assert not decision.allowed and CARD in decision.reason  # the engine quotes the value ...
    with pytest.raises(GovernanceDenied) as denied:
        setup.governor.enforce(SUBJECT, decision)
    (record,) = setup.records("tool.authorize")
    for text in (str(denied.value), record.error or ""):  # ... governance never passes it on
        assert CARD not in text and EMAIL not in text
