"""Governed openai SDK clients: plain SDK calls go through the GovernedClient, against a real HTTP server.

The endpoint is FaultyFakeOpenAIServer (a named fake of a model server): its paid counter (successful
completions per item key, ``[key=...]`` in the prompt) and its recorded request bodies are what "paid once"
and "nothing secret left" are checked against. Real PolicyProvider, BudgetLedger, AuditStore and journal
on a SQLite file; the SDK's real HTTP stack, with the governed transport under it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest
from sqlalchemy import Engine

from governed_ai.core.audit import StoredAuditRecord
from governed_ai.core.client import GovernedClient
from governed_ai.core.governor import Governor
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.llm_settings import LLMConnectionSettings
from governed_ai.core.openai_gateway import (
    close_open_gateways,
    governed_async_openai_client,
    governed_openai_client,
)
from governed_ai.core.policy import PolicyProvider
from governed_ai.core.pricing import PriceTable
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.core.transport import ModelTransport
from tests.audit_support import keyed_audit_store
from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer

CONN = "llm"
SUBJECT = Subject(dag_id="sdk_dag", task_id="plain_task", run_id="run-1")
PRICES = PriceTable.from_mapping({"*": {"input_per_1m_tokens": 1.0, "output_per_1m_tokens": 2.0}})
EMAIL = "canary.person@example.com"
SECRET = "TKT-0123456789abcdef"

POLICY = """
version: 1
defaults: {redact_prompts: true, redact_outputs: true, store_content: false}
rules:
  - name: sdk-rule
    match: {dag_id: "sdk_*"}
    models:
      - {connection: llm, model: fake-model, max_tokens_per_call: 64}
      - {connection: llm, model: fake-embedder}
      - {connection: llm, model: unlisted-model}
      - {connection: llm, model: small-input, max_input_tokens: 20}
    model_routes:
      default: {model: fake-model}
    redaction:
      custom_patterns: [{name: ticket_secret, regex: "TKT-[0-9a-f]{16}"}]
"""


def budget(max_tokens: int) -> str:
    return (
        "budgets:\n  - name: sdk-budget\n    scope: dag\n"
        f'    match: {{dag_id: "sdk_*"}}\n    period: run\n    max_tokens: {max_tokens}\n'
    )


@dataclass
class Setup:
    governor: Governor
    server: FaultyFakeOpenAIServer
    engine: Engine

    def governed(self, subject: Subject = SUBJECT) -> GovernedClient:
        settings = LLMConnectionSettings.model_validate(
            {"base_url": self.server.base_url, "api_key": "k", "max_retries": 0}
        )
        return GovernedClient(
            self.governor,
            ModelTransport(settings, connection_id=CONN),
            subject,
            connection_id=CONN,
            prices=PRICES,
            default_model="fake-model",
        )

    def sdk(self, subject: Subject = SUBJECT) -> openai.OpenAI:
        return governed_openai_client(self.governed(subject))

    def records(self, action: str | None = None) -> list[StoredAuditRecord]:
        return self.governor.audit.query(action=action, order="asc", limit=None)

    def paid(self) -> int:
        return sum(self.server.stats()["successes"].values())

    def bodies(self) -> str:
        return "\n".join(body for _, body in self.server.request_bodies())


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Setup]]:
    engine = create_store_engine(f"sqlite:///{tmp_path}/g.db")
    servers: list[FaultyFakeOpenAIServer] = []

    def build(policy: str = POLICY, *, latency_ms: float = 1) -> Setup:
        models = ("fake-model", "fake-embedder", "small-input")
        config = FaultConfig(latency_ms=latency_ms, record_bodies=True, models=models)
        server = FaultyFakeOpenAIServer(config).__enter__()
        servers.append(server)
        governor = Governor(
            policy=PolicyProvider(text=policy), ledger=BudgetLedger(engine), audit=keyed_audit_store(engine)
        )
        return Setup(governor, server, engine)

    yield build
    close_open_gateways()
    for server in servers:
        server.__exit__()
    engine.dispose()


def ask(client: openai.OpenAI, text: str, *, model: str = "fake-model", **kwargs: object) -> object:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kwargs)  # type: ignore[call-overload]


def test_an_allowed_sdk_call_is_governed_audited_and_answered_in_the_openai_shape(make):
    setup = make()
    with setup.sdk() as client:
        reply = ask(client, "classify [key=a1]", max_completion_tokens=20)

    assert reply.choices[0].message.content == "positive [key=a1]"
    assert reply.choices[0].finish_reason == "stop"
    (call,) = setup.records("model.call")
    assert (call.decision, call.rule, call.model, call.resource) == (
        "allow",
        "sdk-rule",
        "fake-model",
        "llm/fake-model",
    )
    assert reply.usage.prompt_tokens == call.prompt_tokens and reply.usage.completion_tokens == 5
    assert reply.model_extra["governed_ai"]["rule"] == "sdk-rule"
    assert reply.model_extra["governed_ai"]["replayed"] is False
    assert setup.server.stats()["successes"] == {"a1": 1}
    (_, body), *_ = setup.server.request_bodies()
    assert '"max_tokens":20' in body.replace(" ", "")  # max_completion_tokens became the governed max_tokens


def test_the_policy_caps_max_tokens_and_routes_a_role(make):
    setup = make()
    with setup.sdk() as client:
        reply = ask(client, "route me [key=r1]", model="default", max_tokens=5000)

    assert reply.model == "fake-model"
    (_, body), *_ = setup.server.request_bodies()
    assert '"max_tokens":64' in body.replace(" ", "")  # max_tokens_per_call of the grant


def test_a_denied_model_raises_an_openai_error_in_the_caller_and_is_audited(make):
    setup = make()
    with setup.sdk() as client, pytest.raises(openai.PermissionDeniedError) as denied:
        ask(client, "hi [key=d1]", model="gpt-4o")

    assert denied.value.status_code == 403
    assert "'gpt-4o'" in denied.value.message
    assert denied.value.body["code"] == "GovernanceDenied"  # type: ignore[index]
    (deny,) = [r for r in setup.records() if r.decision == "deny"]
    assert (deny.action, deny.model) == ("model.authorize", "gpt-4o")
    assert setup.server.stats()["chat_requests"] == 0


@pytest.mark.parametrize(
    ("model", "error", "code", "status"),
    [
        ("unlisted-model", openai.NotFoundError, "ModelNotServed", 404),  # granted, not served
        ("small-input", openai.BadRequestError, "InputTooLarge", 400),  # over the grant's input limit
    ],
)
def test_other_governed_failures_keep_their_meaning_in_the_sdk_error(make, model, error, code, status):
    setup = make()
    with setup.sdk() as client, pytest.raises(error) as failed:
        ask(client, "a prompt that is long enough to be over twenty tokens " * 4 + "[key=f1]", model=model)

    assert failed.value.status_code == status and failed.value.body["code"] == code  # type: ignore[index]
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert setup.server.stats()["chat_requests"] == 0


def test_budgets_hold_and_the_paid_counter_equals_what_the_ledger_charged(make):
    setup = make(POLICY + budget(100))
    with setup.sdk() as client:
        ask(client, "first [key=b1]", max_tokens=60)
        with pytest.raises(openai.PermissionDeniedError) as stopped:
            for index in range(2, 10):  # each reserves 60 + prompt tokens; the budget runs out
                ask(client, f"next [key=b{index}]", max_tokens=60)

    assert stopped.value.body["code"] == "BudgetExhausted"  # type: ignore[index]
    assert "sdk-budget" in stopped.value.message
    (status,) = setup.governor.ledger.status()
    assert status.spent_tokens == sum(setup.server.stats()["tokens"].values())
    assert status.reserved_tokens == 0
    assert len(setup.records("model.call")) == setup.paid() >= 1
    assert [r.action for r in setup.records() if r.decision == "deny"] == ["budget.deny"]


def test_secrets_and_personal_data_in_the_prompt_never_reach_the_server(make):
    setup = make()
    with setup.sdk() as client:
        reply = ask(client, f"Customer {EMAIL} sent ticket {SECRET} [key=p1]")

    sent = setup.bodies()
    assert sent and EMAIL not in sent and SECRET not in sent
    assert reply.model_extra["governed_ai"]["redactions"] >= 2
    stored = "\n".join(str(r.model_dump()) for r in setup.records())
    assert EMAIL not in stored and SECRET not in stored


def test_personal_data_in_tool_call_arguments_sent_back_as_history_is_redacted(make):
    setup = make()
    history = [
        {"role": "user", "content": "Find the customer [key=h1]"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": f'{{"email": "{EMAIL}"}}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": f"found {EMAIL}"},
    ]
    with setup.sdk() as client:
        client.chat.completions.create(model="fake-model", messages=history)

    (_, body), *_ = setup.server.request_bodies()
    assert EMAIL not in body and '"tool_call_id":"call_1"' in body.replace(" ", "")
    assert '"id":"call_1"' in body.replace(" ", "")  # ids kept: the tool result refers to them


def test_a_retried_task_replays_from_the_journal_and_pays_nothing_again(make):
    setup = make()
    prompts = [f"item [key=k{i}]" for i in range(3)]
    with setup.sdk(SUBJECT) as first_try:
        first = [ask(first_try, p).choices[0].message.content for p in prompts]
    paid_after_first = setup.paid()

    second = SUBJECT.model_copy(update={"try_number": 2})
    with setup.sdk(second) as second_try:
        replies = [ask(second_try, p) for p in prompts]

    assert paid_after_first == 3
    assert setup.paid() == paid_after_first  # 0 new paid calls
    assert [r.choices[0].message.content for r in replies] == first
    assert all(r.model_extra["governed_ai"]["replayed"] for r in replies)
    assert len(setup.records("model.replay")) == 3


@pytest.mark.parametrize(
    ("call", "error", "field"),
    [
        (lambda c: ask(c, "x [key=s1]", stream=True), openai.BadRequestError, "stream=True"),
        (lambda c: ask(c, "x [key=s2]", n=2), openai.BadRequestError, "n=2"),
        (lambda c: ask(c, "x [key=s3]", logprobs=True), openai.BadRequestError, "'logprobs'"),
        (lambda c: ask(c, "x [key=s4]", extra_body={"surprise": 1}), openai.BadRequestError, "'surprise'"),
        (lambda c: c.models.list(), openai.NotFoundError, "GET /v1/models"),
        (
            lambda c: c.completions.create(model="fake-model", prompt="x"),
            openai.NotFoundError,
            "/completions",
        ),
    ],
)
def test_unsupported_requests_are_refused_audited_and_never_passed_through(make, call, error, field):
    setup = make()
    with setup.sdk() as client, pytest.raises(error) as refused:
        call(client)

    assert field in refused.value.message
    (record,) = setup.records("openai.request")
    assert (record.decision, record.outcome) == ("deny", "unsupported")
    assert setup.server.stats()["requests"] == 0  # not even a model listing reached the endpoint


def test_the_async_client_is_governed_the_same_way(make):
    setup = make()

    async def run() -> tuple[str | None, str | None]:
        async with governed_async_openai_client(setup.governed()) as client:
            one, two = await asyncio.gather(
                client.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "[key=x1]"}]
                ),
                client.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "[key=x2]"}]
                ),
            )
        return one.choices[0].message.content, two.choices[0].message.content

    assert asyncio.run(run()) == ("positive [key=x1]", "positive [key=x2]")
    assert setup.server.stats()["successes"] == {"x1": 1, "x2": 1}
    assert len(setup.records("model.call")) == 2


def test_async_calls_run_concurrently_without_a_thread_each(make):
    """Twenty calls gathered on the caller's loop overlap on the governed client's loop: the wall time is
    a few server latencies, not twenty (a thread pool per call would queue them on a 2-core machine)."""
    setup = make(latency_ms=500)

    async def run() -> float:
        async with governed_async_openai_client(setup.governed()) as client:
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="fake-model", messages=[{"role": "user", "content": f"[key=c{i}]"}]
                    )
                    for i in range(20)
                )
            )
            return time.perf_counter() - started

    seconds = asyncio.run(run())
    assert sum(setup.server.stats()["successes"].values()) == 20
    print(f"20 concurrent calls at 500 ms: {seconds:.2f} s")
    assert seconds < 1.5, seconds  # a 6-thread pool (2 cores) would need 4 rounds: 2 s


def test_embeddings_are_governed_redacted_and_decoded_by_the_sdk(make):
    setup = make()
    texts = ["plain text", f"mail {EMAIL}"]
    with setup.sdk() as client:
        reply = client.embeddings.create(model="fake-embedder", input=texts)  # the SDK asks for base64

    sent = setup.bodies()
    assert EMAIL not in sent and "plain text" in sent
    (call,) = setup.records("embedding.call")
    assert call.decision == "allow" and reply.usage.prompt_tokens == call.prompt_tokens
    digest = hashlib.sha256(b"plain text").digest()
    expected = np.array([(digest[i % 32] - 127.5) / 127.5 for i in range(32)], dtype=np.float32)
    np.testing.assert_allclose(np.array(reply.data[0].embedding, dtype=np.float32), expected, rtol=1e-6)


def test_base64_embeddings_are_little_endian_float32_rows(make):
    setup = make()
    with setup.sdk() as client:
        raw = client.embeddings.with_raw_response.create(
            model="fake-embedder", input="plain text", encoding_format="base64"
        )
    row = raw.http_response.json()["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(row), dtype="<f4").shape == (32,)


def test_closing_the_sdk_client_closes_the_governed_client_and_a_closed_one_refuses(make):
    setup = make()
    client = setup.sdk()
    ask(client, "one [key=c1]")
    left_open = setup.sdk()  # never closed by its code: closed when the task ends (the listener)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        ask(client, "two [key=c2]")
    assert close_open_gateways() == 1  # only the one left open
    with pytest.raises(openai.BadRequestError, match="closed"):
        ask(left_open, "three [key=c3]")
    assert setup.server.stats()["successes"] == {"c1": 1}
