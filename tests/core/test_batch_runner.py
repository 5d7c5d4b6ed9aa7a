"""BatchRunner end to end over HTTP: FakeOpenAIServer (a named fake model with scripted replies), and a real
Governor, budget ledger, audit trail and replay journal on SQLite.

Scripted replies are consumed in request order, so tests that script per-item replies run with
concurrency 1; the others use the fake's default reply and real concurrency.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from governed_ai.core.audit import StoredAuditRecord
from governed_ai.core.batch import (
    BatchProgress,
    BatchPrompt,
    BatchRun,
    BatchRunner,
    BatchSettings,
    CallSettings,
    make_items,
)
from governed_ai.core.client import GovernedClient
from governed_ai.core.governor import FixedPolicy, Governor
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.llm_settings import LLMConnectionSettings
from governed_ai.core.policy import PolicyProvider, engine_from_text
from governed_ai.core.pricing import PriceTable
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.core.transport import ModelTransport, per_minute_limiter
from tests.audit_support import keyed_audit_store
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

SUBJECT = Subject(dag_id="batch_dag", task_id="classify", run_id="run-1")
PRICES = PriceTable.from_mapping({"*": {"input_per_1m_tokens": 1.0, "output_per_1m_tokens": 2.0}})
EMAIL = "alice@example.com"
CARD = "4111 1111 1111 1111"  # Luhn-valid test number


def policy(*, budget_tokens: int | None = None, store_content: bool = False) -> str:
    text = f"""
version: 1
defaults: {{store_content: {str(store_content).lower()}}}
rules:
  - name: batch-rule
    match: {{dag_id: batch_dag}}
    models: [{{connection: llm, model: fake-model, max_tokens_per_call: 50}}]
    redaction: {{prompts: true, outputs: true}}
"""
    if budget_tokens is not None:
        text += (
            "budgets:\n"
            f"  - {{name: batch-run, scope: dag, match: {{dag_id: batch_dag}}, period: run, "
            f"max_tokens: {budget_tokens}}}\n"
        )
    return text


class Label(BaseModel):
    label: str


@dataclass
class Harness:
    server: FakeOpenAIServer
    governor: Governor
    progress: list[BatchProgress]
    last_client: GovernedClient | None = None

    def run(
        self,
        rows: list[Any],
        *,
        template: str = "Classify: {{ item.text }}",
        schema: type[BaseModel] | None = None,
        max_tokens: int | None = 20,
        try_number: int = 1,
        budget_block_size: int = 16,
        max_retries: int = 0,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        before_each: Callable[[int], None] | None = None,
        prices: PriceTable = PRICES,
        **settings: Any,
    ) -> BatchRun:
        connection = LLMConnectionSettings(
            base_url=self.server.base_url, api_key="k", max_retries=max_retries
        )
        transport = ModelTransport(
            connection,
            connection_id="llm",
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )
        subject = SUBJECT.model_copy(update={"try_number": try_number})
        client = GovernedClient(
            self.governor,
            transport,
            subject,
            connection_id="llm",
            prices=prices,
            budget_block_size=budget_block_size,
        )
        self.last_client = client
        call = CallSettings(
            model="fake-model", max_tokens=max_tokens, output_schema=schema, max_repair_attempts=1
        )
        runner = BatchRunner(
            client, call, BatchPrompt(template), BatchSettings(**settings), on_progress=self.progress.append
        )
        with client:
            return client.run(runner.run(make_items(rows, key_field="id")))

    def audit(self, action: str = "model.call") -> list[StoredAuditRecord]:
        return self.governor.audit.query(action=action, order="asc", limit=None)

    def item(self, key: str) -> str:
        assert self.last_client is not None
        return self.last_client.item_digest(key)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def harness(tmp_path: Path, server: FakeOpenAIServer) -> Iterator[Callable[..., Harness]]:
    engines = []

    def build(policy_text: str | None = None, default: ScriptedReply | None = None) -> Harness:
        engine = create_store_engine(f"sqlite:///{tmp_path / 'governance.db'}")
        engines.append(engine)
        governor = Governor(
            policy=PolicyProvider(text=policy_text or policy()),
            ledger=BudgetLedger(engine),
            audit=keyed_audit_store(engine),
        )
        # One server for the module (starting and stopping one costs 0.5 s); each test starts it afresh.
        server.replies.clear()
        server.requests.clear()
        server.paths.clear()
        server.default = default or ScriptedReply(content="ok")
        return Harness(server, governor, [])

    yield build
    for engine in engines:
        engine.dispose()


def rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"t{i}", "text": f"ticket number {i}"} for i in range(n)]


def test_every_item_gets_a_result_in_input_order_and_an_audit_record(harness):
    h = harness(default=ScriptedReply(content="positive", prompt_tokens=12, completion_tokens=3))
    run = h.run(rows(40), concurrency=8)

    assert [o.key for o in run.outcomes] == [f"t{i}" for i in range(40)]
    assert {o.status for o in run.outcomes} == {"ok"}
    first = run.outcomes[0].to_json()
    assert (first["key"], first["position"], first["status"], first["content"]) == ("t0", 0, "ok", "positive")
    assert first["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert first["governance"]["rule"] == "batch-rule"
    sent = sorted(r["messages"][-1]["content"] for r in h.server.chat_requests)
    assert sent == sorted(f"Classify: ticket number {i}" for i in range(40))
    assert {r["max_tokens"] for r in h.server.chat_requests} == {20}

    calls = h.audit()
    assert len(calls) == 40
    # The audit trail carries a digest of each item's key, never the key itself.
    assert sorted(r.extra["item"] for r in calls) == sorted(h.item(f"t{i}") for i in range(40))
    assert {(r.outcome, r.decision, r.rule, r.model, r.resource) for r in calls} == {
        ("ok", "allow", "batch-rule", "fake-model", "llm/fake-model")
    }
    assert {(r.prompt_tokens, r.completion_tokens) for r in calls} == {(12, 3)}
    assert sum(r.cost_usd or 0 for r in calls) == pytest.approx(run.progress.cost_usd)
    assert run.progress.cost_usd == pytest.approx(40 * PRICES.cost("fake-model", 12, 3))
    assert h.governor.audit.verify().ok
    assert (run.progress.ok, run.progress.failed, run.progress.tokens) == (40, 0, 40 * 15)
    assert h.progress[-1] == run.progress  # the final progress is reported


def test_policy_caps_max_tokens_per_call(harness):
    h = harness()
    h.run(rows(2), max_tokens=500)
    assert {r["max_tokens"] for r in h.server.chat_requests} == {50}
    h.run(rows(1), max_tokens=None)
    assert h.server.chat_requests[-1]["max_tokens"] == 50


def test_structured_output_is_validated_and_repaired_per_item(harness):
    h = harness()
    h.server.script('{"label": 3', '{"label": "billing"}', '{"label": "refund"}')
    run = h.run(rows(2), schema=Label, concurrency=1)

    assert [o.status for o in run.outcomes] == ["ok", "ok"]
    assert [o.result["output"] for o in run.outcomes] == [{"label": "billing"}, {"label": "refund"}]
    assert [o.result["attempts"] for o in run.outcomes] == [2, 1]
    repair = h.server.chat_requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": '{"label": 3'}
    assert repair[-1]["role"] == "user"
    assert "response_format" in h.server.chat_requests[0]
    assert len(h.audit()) == 3  # every paid request is audited, the repair included


def test_failures_are_per_item_with_reasons_and_the_batch_goes_on(harness):
    h = harness(default=ScriptedReply(content="positive"))
    h.server.script(
        ScriptedReply(status=400, content="context length exceeded"),  # t0: permanent
        ScriptedReply(status=429, headers={"retry-after-ms": "1"}),  # t1: transient twice ...
        ScriptedReply(status=429, headers={"retry-after-ms": "1"}),  # ... and out of retries
        ScriptedReply(raw_body=b"<html>bad gateway</html>", headers={"Content-Type": "text/html"}),  # t2
        "positive",  # t2's retry succeeds
    )
    data = [*rows(4), {"id": "t4", "body": "no text field"}, {"id": "t5", "text": "fine"}]
    run = h.run(data, schema=None, concurrency=1, max_retries=1)

    by_key = {o.key: o for o in run.outcomes}
    assert by_key["t0"].status == "failed"
    assert "EndpointRejected" in by_key["t0"].error and "400" in by_key["t0"].error
    assert by_key["t1"].status == "failed" and "RateLimitError" in by_key["t1"].error
    assert by_key["t2"].status == "ok"  # the malformed body was retried
    assert by_key["t3"].status == "ok"
    assert by_key["t4"].status == "failed" and "prompt template failed" in by_key["t4"].error
    assert by_key["t5"].status == "ok"
    assert {f.key for f in run.failures} == {"t0", "t1", "t4"}
    assert run.http_retries == 2
    assert (run.progress.ok, run.progress.failed) == (3, 3)
    calls = {r.extra["item"]: r for r in h.audit()}
    assert calls[h.item("t0")].extra["http_attempts"] == 1  # not retried
    assert calls[h.item("t2")].extra["http_attempts"] == 2
    errors = {r.extra["item"] for r in h.audit() if r.outcome == "error"}
    assert errors == {h.item("t0"), h.item("t1")}  # t4 never reached the model: nothing to audit as a call


def test_a_reply_that_never_fits_the_schema_fails_the_item_and_is_charged(harness):
    h = harness(policy(budget_tokens=100_000), default=ScriptedReply(content="not json", completion_tokens=4))
    run = h.run(rows(1), schema=Label, concurrency=1)
    (outcome,) = run.outcomes
    assert outcome.status == "failed" and "did not match output_schema Label" in outcome.error
    assert [(r.outcome, r.prompt_tokens, r.completion_tokens) for r in h.audit()] == [("ok", 10, 4)] * 2
    (budget,) = h.governor.ledger.status()
    assert (budget.spent_tokens, budget.reserved_tokens) == (28, 0)  # both paid attempts settled


def test_prompts_and_outputs_are_redacted_and_content_audited_only_redacted(harness):
    h = harness(policy(store_content=True), default=ScriptedReply(content=f"card on file: {CARD}"))
    run = h.run([{"id": "a", "text": f"mail me at {EMAIL}"}])

    (sent,) = h.server.chat_requests
    assert EMAIL not in json.dumps(sent) and "[REDACTED:EMAIL]" in sent["messages"][-1]["content"]
    (outcome,) = run.outcomes
    assert CARD not in outcome.result["content"] and "[REDACTED:PAYMENT_CARD]" in outcome.result["content"]
    assert outcome.result["governance"]["redactions"] == 2
    (record,) = h.audit()
    assert record.content is not None and "[REDACTED:EMAIL]" in record.content
    assert EMAIL not in record.content and CARD not in record.content


def test_content_is_not_audited_unless_the_policy_says_so(harness):
    h = harness(policy(store_content=False))
    h.run(rows(2))
    assert [r.content for r in h.audit()] == [None, None]


def test_failure_reasons_are_redacted(harness):
    h = harness()
    h.server.script(ScriptedReply(status=400, content=f"bad request from {EMAIL}"))
    run = h.run(rows(1), concurrency=1)
    (outcome,) = run.outcomes
    assert EMAIL not in outcome.error and "[REDACTED:EMAIL]" in outcome.error
    assert EMAIL not in (h.audit()[0].error or "")


def test_completed_items_are_replayed_by_the_next_try_and_failed_ones_run_again(harness):
    h = harness(default=ScriptedReply(content="positive"))
    h.server.script(
        ScriptedReply(status=400)
    )  # one item fails: it is not journaled as done, so it runs again
    first = h.run(rows(6), concurrency=1)
    assert [o.status for o in first.outcomes].count("failed") == 1

    calls_before = len(h.server.chat_requests)
    second = h.run(rows(6), try_number=2, concurrency=3)
    assert len(h.server.chat_requests) - calls_before == 1
    assert [o.status for o in second.outcomes] == [
        "ok",
        "replayed",
        "replayed",
        "replayed",
        "replayed",
        "replayed",
    ]
    assert second.outcomes[1].result["content"] == first.outcomes[1].result["content"]
    assert len(h.audit("model.replay")) == 5
    assert (second.progress.replayed, second.progress.ok) == (5, 1)


def test_a_batch_whose_items_never_validate_pays_no_request_twice_when_retried(harness):
    h = harness(default=ScriptedReply(content="never json"))
    for try_number in (1, 2):
        run = h.run(rows(5), schema=Label, try_number=try_number, concurrency=2)
        assert {o.status for o in run.outcomes} == {"failed"}
    bodies = [json.dumps(r, sort_keys=True) for r in h.server.chat_requests]
    assert len(bodies) == 5 * 2 * 2  # two paid attempts per item and try
    assert len(set(bodies)) == len(bodies)  # none of them sent twice


def test_ledger_after_a_run_equals_the_sum_of_item_usage(harness):
    h = harness(policy(budget_tokens=1_000_000), default=ScriptedReply(content="x", prompt_tokens=9))
    h.server.script(*(ScriptedReply(content="y", prompt_tokens=9, completion_tokens=c) for c in range(1, 30)))
    run = h.run(rows(50), concurrency=6, budget_block_size=8)

    (budget,) = h.governor.ledger.status()
    used = sum(o.result["usage"]["total_tokens"] for o in run.outcomes)
    assert budget.spent_tokens == used == run.progress.tokens
    assert budget.reserved_tokens == 0
    assert run.budget_reservations <= 10  # blocks of 8, not 50 reservations


def test_a_budget_that_runs_out_stops_the_rest_as_not_run(harness):
    # Worst case per item: prompt estimate + 20 completion tokens; room for a few items only.
    h = harness(
        policy(budget_tokens=150), default=ScriptedReply(content="x", prompt_tokens=5, completion_tokens=5)
    )
    run = h.run(rows(20), concurrency=1, budget_block_size=4)

    statuses = [o.status for o in run.outcomes]
    assert "ok" in statuses and "not_run" in statuses
    assert statuses == sorted(statuses, key=lambda s: s != "ok")  # with one worker: ok first, then stopped
    assert run.stopped_by_budget and run.stopped is not None and "batch-run" in run.stopped
    assert all("Budget exhausted" in o.error for o in run.outcomes if o.status == "not_run")
    assert len(h.server.chat_requests) == statuses.count("ok")
    (budget,) = h.governor.ledger.status()
    assert budget.spent_tokens == 10 * statuses.count("ok") <= 150
    assert len(h.audit("budget.deny")) == 1


def test_an_unpriced_model_under_a_cost_budget_stops_the_batch_before_any_call(harness):
    cost_budget = (
        "budgets:\n  - {name: batch-cost, scope: dag, match: {dag_id: batch_dag}, period: run, "
        "max_cost_usd: 1.0}\n"
    )
    h = harness(policy() + cost_budget)
    run = h.run(rows(5), concurrency=2, prices=PriceTable())

    assert {o.status for o in run.outcomes} == {"not_run"} and h.server.chat_requests == []
    # Not a budget that runs out (waiting for the next period would not help): the batch fails.
    assert not run.stopped_by_budget and run.stopped is not None
    assert "'fake-model' has no price" in run.stopped and "batch-cost" in run.stopped
    assert len(h.audit("budget.unpriced")) >= 1


def test_a_policy_broken_mid_batch_stops_it_within_one_in_flight_window(harness):
    h = harness()
    served = 0
    original = h.server._next_reply

    def break_the_policy_after_ten() -> ScriptedReply:
        nonlocal served
        served += 1
        if served == 10:
            h.governor.policy = FixedPolicy(engine_from_text("version: 1\nrules: [\n"))  # no longer loads
        return original()

    h.server._next_reply = break_the_policy_after_ten  # type: ignore[method-assign]
    concurrency = 4
    run = h.run(rows(300), concurrency=concurrency)
    assert len(h.server.chat_requests) <= 10 + concurrency
    statuses = [o.status for o in run.outcomes]
    assert statuses.count("not_run") >= 300 - 10 - concurrency
    assert run.stopped is not None and "failed to load" in run.stopped
    assert all("failed to load" in o.error for o in run.outcomes if o.status == "not_run")
    denials = h.governor.audit.query(decision="deny", limit=None)
    assert 1 <= len(denials) <= concurrency


def test_a_token_rate_limit_below_one_items_estimate_does_not_wedge_the_batch(harness):
    h = harness()
    run = h.run(rows(1), tokens_per_minute=5, requests_per_minute=600)
    assert [o.status for o in run.outcomes] == ["ok"]


@pytest.mark.parametrize(
    ("per_minute", "largest", "burst", "period_s"),
    [
        (600, 1, 10, 1.0),  # 10 per second, not 600 at once
        (30, 1, 1, 2.0),  # below one a second: one every two seconds
        (60_000, 1_500, 1_500, 1.5),  # a bucket never smaller than the largest single acquisition
        (60_000, 10, 1_000, 1.0),
    ],
)
def test_per_minute_limits_are_spread_over_the_minute(per_minute, largest, burst, period_s):
    limiter = per_minute_limiter(per_minute, largest=largest)
    assert limiter.max_rate == pytest.approx(burst)
    assert limiter.time_period == pytest.approx(period_s)
    assert limiter.max_rate / limiter.time_period * 60 == pytest.approx(per_minute)  # the average rate
