"""GovernedClient: the one path to a model, against a real HTTP server (FakeOpenAIServer).

Real PolicyProvider, BudgetLedger, AuditStore and journal on a SQLite file; the endpoint is the scripted
fake server, so every request the client sends is seen (and counted) by the server exactly as sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import BaseModel
from sqlalchemy import Engine

from governed_ai.core.audit import StoredAuditRecord
from governed_ai.core.chat import ChatRequest
from governed_ai.core.client import GovernedChatResult, GovernedClient
from governed_ai.core.errors import (
    EndpointRejected,
    GovernanceDenied,
    ModelNotServed,
    ModelUnavailable,
    StructuredOutputError,
    UnpricedModel,
)
from governed_ai.core.governor import FixedPolicy, Governor
from governed_ai.core.journal import ReplayJournal
from governed_ai.core.ledger import BudgetLedger, BudgetStatus
from governed_ai.core.llm_settings import LLMConnectionSettings
from governed_ai.core.policy import PolicyProvider, engine_from_text
from governed_ai.core.pricing import PriceTable
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.core.tokens import InputTooLarge
from governed_ai.core.transport import ModelTransport
from tests.audit_support import keyed_audit_store
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

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
      - {connection: llm, model: embedder}
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


def cost_budget_yaml(max_cost_usd: float, *, max_tokens: int | None = None, allow: str = "") -> str:
    return (
        "budgets:\n"
        "  - name: unit-cost\n"
        "    scope: dag\n"
        '    match: {dag_id: "unit_*"}\n'
        "    period: run\n"
        f"    max_cost_usd: {max_cost_usd}\n"
        + (f"    max_tokens: {max_tokens}\n" if max_tokens is not None else "")
        + (f"    allow_unpriced_models: {allow}\n" if allow else "")
    )


def budget_yaml(max_tokens: int) -> str:
    return (
        "budgets:\n"
        "  - name: unit-budget\n"
        "    scope: dag\n"
        '    match: {dag_id: "unit_*"}\n'
        "    period: run\n"
        f"    max_tokens: {max_tokens}\n"
    )


class Verdict(BaseModel):
    label: str


@dataclass
class Setup:
    governor: Governor
    server: FakeOpenAIServer
    engine: Engine

    def client(
        self, subject: Subject = SUBJECT, *, prices: PriceTable = PRICES, **settings: object
    ) -> GovernedClient:
        values: dict[str, object] = {"base_url": self.server.base_url, "api_key": "k", "max_retries": 0}
        values.update(settings)
        connection = LLMConnectionSettings.model_validate(values)
        return GovernedClient(
            self.governor,
            ModelTransport(connection, connection_id=CONN),
            subject,
            connection_id=CONN,
            prices=prices,
            default_model="primary",
        )

    def chat(self, content: str = "hello", *, model: str = "primary", subject: Subject = SUBJECT,
             **request: object) -> GovernedChatResult:  # fmt: skip
        with self.client(subject) as client:
            return client.chat(
                ChatRequest(messages=[{"role": "user", "content": content}], model=model, **request),
                prompt_version="v1",
            )

    def records(self, action: str) -> list[StoredAuditRecord]:
        return self.governor.audit.query(action=action, order="asc", limit=None)

    def budget(self) -> BudgetStatus:
        (status,) = self.governor.ledger.status()
        return status

    def sent(self) -> list[dict[str, object]]:
        return self.server.chat_requests

    def sent_text(self) -> str:
        return "\n".join(str(m.get("content")) for r in self.sent() for m in r["messages"])  # type: ignore[attr-defined]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Setup]]:
    engine = create_store_engine(f"sqlite:///{tmp_path}/g.db")
    servers: list[FakeOpenAIServer] = []

    def build(
        text: str | None = None,
        *,
        models: tuple[str, ...] = ("primary", "backup", "capped", "embedder"),
        default: ScriptedReply | None = None,
    ) -> Setup:
        governor = Governor(
            policy=PolicyProvider(text=text if text is not None else policy_text()),
            ledger=BudgetLedger(engine),
            audit=keyed_audit_store(engine),
        )
        server = FakeOpenAIServer(models=models, default=default or ScriptedReply(content="fine")).__enter__()
        servers.append(server)
        return Setup(governor, server, engine)

    yield build
    for server in servers:
        server.__exit__()
    engine.dispose()


# -- authorization and routing ---------------------------------------------------------------------------


def test_an_allowed_call_is_authorized_sent_audited_and_shaped_for_xcom(make):
    setup = make()
    governed = setup.chat()

    assert [r["model"] for r in setup.sent()] == ["primary"]
    assert governed.rule == "unit-rule" and governed.fallbacks_tried == () and not governed.replayed
    (auth,) = setup.records("model.authorize")
    assert (auth.decision, auth.rule, auth.model) == ("allow", "unit-rule", "primary")
    (call,) = setup.records("model.call")
    assert (call.outcome, call.resource, call.prompt_version) == ("ok", "llm/primary", "v1")
    assert (call.prompt_tokens, call.completion_tokens) == (10, 5)
    assert call.cost_usd == pytest.approx(PRICES.cost("primary", 10, 5))
    xcom = governed.to_xcom()
    assert {"model", "usage", "cost_usd", "latency_ms", "governance", "content", "output"} <= set(xcom)
    assert xcom["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert set(xcom["governance"]) == {"rule", "prompt_version", "redactions", "fallbacks_tried"}


def test_a_denied_model_is_never_sent_and_the_denial_is_audited(make):
    setup = make()
    with pytest.raises(GovernanceDenied) as denied:
        setup.chat(model="forbidden")
    assert denied.value.permanent and "'forbidden'" in str(denied.value)
    assert setup.sent() == []
    (auth,) = setup.records("model.authorize")
    assert (auth.decision, auth.outcome, auth.model) == ("deny", "denied", "forbidden")


def test_a_route_falls_back_when_the_first_model_fails(make):
    setup = make(policy_text(budget=budget_yaml(100_000)))
    setup.server.script(ScriptedReply(status=500))  # the first request (to primary) fails
    governed = setup.chat(model="default")
    assert [r["model"] for r in setup.sent()] == ["primary", "backup"]
    assert governed.fallbacks_tried == ("primary",) and governed.result.model == "backup"
    calls = setup.records("model.call")
    assert [(r.model, r.outcome) for r in calls] == [("primary", "error"), ("backup", "ok")]
    assert (setup.budget().spent_tokens, setup.budget().reserved_tokens) == (15, 0)  # the failure is free


def test_a_model_the_endpoint_does_not_serve_is_skipped_before_anything_is_spent(make):
    setup = make(models=("backup",))
    governed = setup.chat(model="default")
    assert [r["model"] for r in setup.sent()] == ["backup"]
    assert governed.fallbacks_tried == ("primary",)
    with pytest.raises(ModelNotServed, match="not served"):
        setup.chat(model="primary")


def test_the_last_fallback_failing_raises_a_retryable_error(make):
    setup = make(default=ScriptedReply(status=503))
    with pytest.raises(ModelUnavailable) as failed:
        setup.chat(model="default")
    assert not failed.value.permanent
    assert [r.outcome for r in setup.records("model.call")] == ["error", "error"]


def test_a_rejected_request_is_permanent(make):
    setup = make(default=ScriptedReply(status=400, content="bad request"))
    with pytest.raises(EndpointRejected) as rejected:
        setup.chat()
    assert rejected.value.permanent and "HTTP 400" in str(rejected.value)


@pytest.mark.parametrize(("requested", "sent"), [(None, 64), (1000, 64), (10, 10)])
def test_max_tokens_per_call_caps_the_request(make, requested, sent):
    setup = make()
    setup.chat(model="capped", max_tokens=requested)
    assert setup.sent()[0]["max_tokens"] == sent


# -- transport: retries, malformed bodies, deadlines -------------------------------------------------------


def test_malformed_bodies_and_server_errors_are_retried_for_single_calls(make):
    setup = make()
    setup.server.script(ScriptedReply(raw_body=b"<html>bad gateway</html>"), ScriptedReply(status=502))
    with setup.client(max_retries=3) as client:
        governed = client.chat(ChatRequest(messages=[{"role": "user", "content": "x"}], model="primary"))
    assert governed.result.content == "fine"
    assert len(setup.sent()) == 3
    (call,) = setup.records("model.call")
    assert call.extra["http_attempts"] == 3


def test_a_hung_endpoint_costs_at_most_the_deadline(make):
    setup = make(default=ScriptedReply(content="late", delay_s=1.0))
    with (
        setup.client(max_retries=10, timeout=0.2, deadline_seconds=0.5) as client,
        pytest.raises(ModelUnavailable),
    ):
        client.chat(ChatRequest(messages=[{"role": "user", "content": "x"}], model="primary"))
    # Ten retries were allowed, the deadline allowed only what fits in 0.5 s of 0.2 s timeouts.
    assert 1 <= len(setup.sent()) <= 3


# -- budgets ---------------------------------------------------------------------------------------------


def test_the_reservation_is_settled_with_actual_usage(make):
    setup = make(policy_text(budget=budget_yaml(10_000)))
    setup.server.script(ScriptedReply(content="ok", prompt_tokens=20, completion_tokens=5))
    setup.chat(max_tokens=50)
    status = setup.budget()
    assert (status.budget, status.period, status.spent_tokens, status.reserved_tokens) == (
        "unit-budget",
        "run-1",
        25,
        0,
    )
    assert status.spent_cost_usd == pytest.approx(PRICES.cost("primary", 20, 5))


def test_budget_exhaustion_denies_audits_and_sends_nothing(make):
    # A request reserves 50 completion tokens plus a small prompt estimate; it really spends 60.
    setup = make(policy_text(budget=budget_yaml(100)))
    setup.server.script(ScriptedReply(content="ok", prompt_tokens=40, completion_tokens=20))
    setup.chat(max_tokens=50)
    with pytest.raises(GovernanceDenied) as denied:
        setup.chat(max_tokens=50)
    assert denied.value.rule == "unit-budget" and denied.value.action == "budget"
    assert len(setup.sent()) == 1
    (record,) = setup.records("budget.deny")
    assert (record.decision, record.rule, record.resource) == ("deny", "unit-budget", "llm/primary")


# Only "backup" has a price: "primary" and "embedder" are unpriced models.
ONLY_BACKUP_PRICED = PriceTable.from_mapping(
    {"backup": {"input_per_1m_tokens": 1.0, "output_per_1m_tokens": 2.0}}
)


def ask(client: GovernedClient, model: str) -> GovernedChatResult:
    return client.chat(
        ChatRequest(messages=[{"role": "user", "content": "hello"}], model=model, max_tokens=20)
    )


def test_an_unpriced_model_under_a_cost_budget_is_denied_before_anything_is_reserved_or_sent(make):
    setup = make(policy_text(budget=cost_budget_yaml(1.0)))
    with setup.client(prices=ONLY_BACKUP_PRICED) as client:
        with pytest.raises(UnpricedModel) as chat_denied:
            ask(client, "primary")
        with pytest.raises(UnpricedModel) as embed_denied:
            client.embed(["some text"], model="embedder")
        assert ask(client, "backup").result.content == "fine"  # a priced model is charged as usual
    denial = chat_denied.value
    assert isinstance(denial, GovernanceDenied) and denial.permanent and denial.rule == "unit-cost"
    for needed in ("'primary'", "'unit-cost'", "no price", "'prices' extra", "allow_unpriced_models"):
        assert needed in str(denial), needed
    assert "'embedder'" in str(embed_denied.value)
    assert [r["model"] for r in setup.sent()] == ["backup"]
    assert not [p for p in setup.server.paths if "embed" in p]
    records = setup.records("budget.unpriced")
    assert [(r.decision, r.outcome, r.rule, r.model) for r in records] == [
        ("deny", "denied", "unit-cost", "primary"),
        ("deny", "denied", "unit-cost", "embedder"),
    ]
    assert setup.budget().spent_cost_usd == pytest.approx(PRICES.cost("backup", 10, 5))
    assert setup.budget().reserved_tokens == 0


def test_a_budget_may_count_named_unpriced_models_in_tokens_only(make):
    setup = make(policy_text(budget=cost_budget_yaml(1.0, max_tokens=1000, allow='["prim*"]')))
    with setup.client(prices=ONLY_BACKUP_PRICED) as client:
        governed = ask(client, "primary")
        with pytest.raises(UnpricedModel):  # not in allow_unpriced_models
            client.embed(["some text"], model="embedder")
    assert governed.result.cost_usd == 0.0
    status = setup.budget()
    assert (status.spent_tokens, status.spent_cost_usd) == (15, 0.0)  # tokens counted, $0


def test_an_unpriced_model_runs_when_no_budget_limits_cost(make):
    setup = make(policy_text(budget=budget_yaml(1000)))
    with setup.client(prices=PriceTable()) as client:
        assert ask(client, "primary").result.cost_usd == 0.0
    assert setup.budget().spent_tokens == 15 and setup.records("budget.unpriced") == []


# -- the journal: nothing paid twice -----------------------------------------------------------------------


def test_a_completed_call_is_replayed_on_a_later_try_not_paid_again(make):
    setup = make(policy_text(budget=budget_yaml(10_000)))
    first = setup.chat("classify this")
    retried = setup.chat("classify this", subject=SUBJECT.model_copy(update={"try_number": 2}))
    assert len(setup.sent()) == 1
    assert retried.replayed and retried.result.content == first.result.content
    (replay,) = setup.records("model.replay")
    assert (replay.outcome, replay.try_number) == ("replayed", 2)
    assert setup.budget().spent_tokens == 15  # charged once
    other_run = SUBJECT.model_copy(update={"run_id": "run-2"})
    setup.chat("classify this", subject=other_run)
    assert len(setup.sent()) == 2  # another task instance pays for its own call


def test_a_never_valid_reply_pays_each_distinct_request_once_across_tries(make):
    setup = make(default=ScriptedReply(content="not json at all"))
    for try_number in (1, 2, 3):
        with pytest.raises(StructuredOutputError) as failed:
            setup.chat(
                "label it",
                subject=SUBJECT.model_copy(update={"try_number": try_number}),
                output_schema=Verdict,
                max_repair_attempts=2,
            )
        assert not failed.value.permanent  # a retry continues the repairs
    bodies = [str(r["messages"]) for r in setup.sent()]
    assert len(bodies) == 9  # three paid attempts per try ...
    assert len(set(bodies)) == 9  # ... each one a request never sent before
    assert len(setup.records("model.replay")) == 3 + 6  # try 2 replays 3, try 3 replays 6


def test_a_repair_continues_on_the_next_try_and_succeeds(make):
    setup = make()
    setup.server.script("nope", "still nope", '{"label": "positive"}')
    with pytest.raises(StructuredOutputError):
        setup.chat("label it", output_schema=Verdict, max_repair_attempts=1)
    governed = setup.chat(
        "label it",
        subject=SUBJECT.model_copy(update={"try_number": 2}),
        output_schema=Verdict,
        max_repair_attempts=1,
    )
    assert governed.result.output == {"label": "positive"}
    assert (governed.result.attempts, governed.result.replayed_attempts) == (3, 2)
    assert len(setup.sent()) == 3


def test_the_journal_holds_redacted_replies_and_no_raw_item_keys(make):
    setup = make()
    setup.server.script(f"reply mentions {EMAIL}")
    with setup.client() as client:
        client.chat(
            ChatRequest(messages=[{"role": "user", "content": "x"}], model="primary"),
            item_key="bob@example.org",
        )
    entries = ReplayJournal(setup.engine, "chat").entries_for_instance(
        setup.governor.instance_digest(SUBJECT)
    )
    stored = str([(e.label, e.result, e.key_sha256) for e in entries.values()])
    assert EMAIL not in stored and "bob@example.org" not in stored
    (call,) = setup.records("model.call")
    assert "bob@example.org" not in str(call.extra) and len(call.extra["item"]) == 16


# -- redaction -------------------------------------------------------------------------------------------


def test_prompt_pii_never_reaches_the_model(make):
    setup = make()
    governed = setup.chat(f"Customer {EMAIL} paid with {CARD}, ticket {TICKET}.")
    sent = setup.sent_text()
    assert EMAIL not in sent and CARD not in sent and TICKET not in sent
    assert "[REDACTED:EMAIL]" in sent and "[REDACTED:TICKET_SECRET]" in sent
    assert governed.redactions == 3


def test_the_prompt_is_sent_as_is_when_the_policy_says_so(make):
    setup = make(policy_text(redact_prompts=False))
    setup.chat(f"Customer {EMAIL}")
    assert EMAIL in setup.sent_text()


def test_the_output_is_redacted_in_the_result(make):
    setup = make()
    setup.server.script(f'{{"label": "{EMAIL}"}}')
    governed = setup.chat(output_schema=Verdict)
    assert governed.result.output == {"label": "[REDACTED:EMAIL]"}
    assert EMAIL not in str(governed.to_xcom())


def test_audit_content_is_kept_only_when_the_policy_says_and_always_redacted(make):
    setup = make()
    setup.chat(f"from {EMAIL}")
    (plain,) = setup.records("model.call")
    assert plain.content is None
    stored = make(policy_text(store_content=True, redact_prompts=False, redact_outputs=False))
    stored.server.script(f"reply to {EMAIL}")
    stored.chat(f"from {EMAIL} card {CARD}", subject=SUBJECT.model_copy(update={"run_id": "other"}))
    record = stored.records("model.call")[-1]
    assert record.content is not None and "[user] from [REDACTED:EMAIL]" in record.content
    assert EMAIL not in record.content and CARD not in record.content


# -- fail-closed, also mid-call ----------------------------------------------------------------------------


def test_a_policy_that_fails_to_load_denies_everything(make):
    setup = make("version: 2\nrules: []\n")
    with pytest.raises(GovernanceDenied, match="failed to load"):
        setup.chat()
    assert setup.sent() == []


def test_a_grant_revoked_between_repairs_stops_the_next_request(make):
    setup = make()
    revoked = engine_from_text("version: 1\nrules: []\n")
    original_chat = setup.server._next_reply

    def revoke_after_first_reply() -> ScriptedReply:
        setup.governor.policy = FixedPolicy(revoked)
        return original_chat()

    setup.server._next_reply = revoke_after_first_reply  # type: ignore[method-assign]
    setup.server.script("not json")
    with pytest.raises(GovernanceDenied):
        setup.chat(output_schema=Verdict, max_repair_attempts=3)
    assert len(setup.sent()) == 1  # the repair was never sent
    assert setup.records("model.authorize")[-1].decision == "deny"


def test_the_audit_chain_verifies_after_a_mix_of_calls(make):
    setup = make(policy_text(budget=budget_yaml(200)))
    setup.server.script(ScriptedReply(content="ok", prompt_tokens=40, completion_tokens=20))
    setup.chat(max_tokens=50)
    with pytest.raises(GovernanceDenied):
        setup.chat(model="forbidden")
    setup.server.script(ScriptedReply(status=500))
    with pytest.raises(ModelUnavailable):
        setup.chat(max_tokens=50, subject=SUBJECT.model_copy(update={"task_id": "unit_two"}))
    verification = setup.governor.audit.verify()
    assert verification.ok, verification.problem
    actions = [r.action for r in setup.governor.audit.query(limit=None, order="asc")]
    assert actions.count("model.call") == 2 and "model.authorize" in actions


# -- embeddings ------------------------------------------------------------------------------------------


def test_embeddings_need_a_grant_are_redacted_budgeted_audited_and_replayed(make):
    setup = make(policy_text(budget=budget_yaml(10_000)))
    with setup.client() as client:
        with pytest.raises(GovernanceDenied):
            client.embed(["x"], model="ungranted-embedder")
        embedded = client.embed([f"mail {EMAIL}", "plain text"], model="embedder")
    assert embedded.vectors.shape == (2, 8) and not embedded.replayed
    (request,) = [r for r, p in zip(setup.server.requests, setup.server.paths, strict=True) if "embed" in p]
    assert EMAIL not in str(request) and embedded.redactions == 1
    (call,) = setup.records("embedding.call")
    assert (call.outcome, call.prompt_tokens, call.model) == ("ok", 2, "embedder")
    assert setup.budget().spent_tokens == 2
    with setup.client(SUBJECT.model_copy(update={"try_number": 2})) as client:
        again = client.embed([f"mail {EMAIL}", "plain text"], model="embedder")
    assert again.replayed and (again.vectors == embedded.vectors).all()
    assert len([p for p in setup.server.paths if "embed" in p]) == 1


def test_the_sync_facade_can_be_used_from_several_threads(make):
    setup = make()
    results: list[str | None] = []
    with setup.client() as client:

        def call(number: int) -> None:
            governed = client.chat(
                ChatRequest(messages=[{"role": "user", "content": f"n{number}"}], model="primary")
            )
            results.append(governed.result.content)

        threads = [threading.Thread(target=call, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == ["fine"] * 6
    assert len(setup.records("model.call")) == 6


# -- budgets that behave like money --------------------------------------------------------------------------


def test_an_oversized_prompt_fails_alone_before_anything_is_reserved_or_sent(make):
    limited = "{connection: llm, model: primary, max_input_tokens: 50}"
    setup = make(
        policy_text(budget=budget_yaml(1_000_000)).replace("{connection: llm, model: primary}", limited)
    )
    with pytest.raises(InputTooLarge, match=r"over the policy's limit of 50 input tokens") as refused:
        setup.chat("word " * 2_000)
    assert refused.value.permanent
    assert setup.sent() == []
    (record,) = setup.records("model.input_limit")
    assert (record.decision, record.outcome, record.extra["limit"]) == ("deny", "denied", 50)
    assert setup.governor.ledger.status() == []  # nothing was ever reserved
    assert setup.chat("short").result.content == "fine"  # the next request goes on


def test_a_route_switches_to_its_cheaper_model_past_the_budget_threshold(make):
    text = policy_text(budget=budget_yaml(1_000)).replace(
        "default: {model: primary, fallbacks: [backup]}",
        "default: {model: primary, when_budget_above: {fraction: 0.8, model: backup}}",
    )
    setup = make(text)
    assert setup.chat(model="default", max_tokens=50).result.model == "primary"
    keys = setup.governor.budget_keys(SUBJECT)
    setup.governor.ledger.reserve(keys, tokens=830, cost_usd=0.0, holder="someone else", ttl_seconds=60)
    governed = setup.chat("again", model="default", max_tokens=50)
    assert governed.result.model == "backup"
    (route,) = setup.records("model.route")
    assert (route.extra["from"], route.extra["to"], route.extra["budget"]) == (
        "primary",
        "backup",
        "unit-budget",
    )
    assert route.extra["used"] >= 0.8 and route.outcome == "switched"
    assert [r["model"] for r in setup.sent()] == ["primary", "backup"]


def test_a_request_a_killed_try_left_in_doubt_is_charged_when_repeated(make):
    from governed_ai.core.journal import StepClaim
    from governed_ai.core.store_writer import StoreWriter

    setup = make(policy_text(budget=budget_yaml(100_000)))
    # Try 1 claimed exactly this request and died before its reply was journaled.
    with setup.client() as client:
        body = ChatRequest(messages=[{"role": "user", "content": "hello"}], model="primary").base_body(
            [{"role": "user", "content": "hello"}]
        )
        key = client._step_key("chat", body, None)
    writer = StoreWriter(setup.governor.audit)
    writer.write_sync(
        steps=[StepClaim("chat", key, setup.governor.instance_digest(SUBJECT), "chat primary", 1, None)]
    )
    writer.close()

    setup.chat("hello", subject=SUBJECT.model_copy(update={"try_number": 2}))
    assert len(setup.sent()) == 1
    assert setup.budget().spent_tokens == 2 * 15  # the repeat, and the dead try's call it stands for
    doubt = [r for r in setup.records("model.call") if r.outcome == "in_doubt"]
    assert [(r.try_number, r.prompt_tokens, r.completion_tokens) for r in doubt] == [(1, 10, 5)]
