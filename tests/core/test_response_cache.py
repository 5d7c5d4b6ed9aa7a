"""The governed response cache, through the real GovernedClient against a real HTTP server (FakeOpenAIServer).

Real policy engine, ledger, audit store, journal and cache table on a SQLite file (and PostgreSQL where the
store fixture offers it); every request the client sends is seen by the fake server, so "nothing was sent"
is counted, not assumed. A later *run* (another task instance) is what the cache serves: a retry of the same
task instance is the journal's job.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from governed_ai.core.audit import AuditRecord
from governed_ai.core.chat import ChatRequest
from governed_ai.core.client import GovernedChatResult
from governed_ai.core.errors import GovernanceDenied, StructuredOutputError
from governed_ai.core.governor import FixedPolicy
from governed_ai.core.observability.metrics import MetricsObserver
from governed_ai.core.policy import PolicyError, engine_from_text, load_policy_text
from governed_ai.core.response_cache import ResponseCache, parse_age, response_cache_table
from governed_ai.core.sqlstore import utc_now
from governed_ai.core.subject import Subject
from tests.core.test_client import CARD, EMAIL, TICKET, Setup, budget_yaml
from tests.core.test_client import make as client_make  # noqa: F401  (the fixture, under another name)
from tests.fakes.openai_server import ScriptedReply

RUN_1 = Subject(dag_id="unit_dag", task_id="unit_task", run_id="nightly-1")
RUN_2 = RUN_1.model_copy(update={"run_id": "nightly-2"})
RUN_3 = RUN_1.model_copy(update={"run_id": "nightly-3"})


def cache_policy(
    *, outputs: str = "structured", ttl: int = 3600, redact_outputs: bool = True, budget: str = "",
    cache: str | None = None,
) -> str:  # fmt: skip
    block = (
        cache
        if cache is not None
        else (f'    cache: {{models: ["primary", "embed*"], ttl_seconds: {ttl}, outputs: {outputs}}}\n')
    )
    return (
        "version: 1\n"
        f"defaults: {{redact_outputs: {str(redact_outputs).lower()}}}\n"
        "rules:\n"
        "  - name: cached-rule\n"
        '    match: {dag_id: "unit_*"}\n'
        "    models:\n"
        "      - {connection: llm, model: primary}\n"
        "      - {connection: llm, model: backup}\n"
        "      - {connection: llm, model: embedder}\n"
        "    redaction:\n"
        '      custom_patterns: [{name: ticket_secret, regex: "TKT-[0-9a-f]{16}"}]\n' + block + budget
    )


class Label(BaseModel):
    label: str


class Clock:
    """The governor's clock, movable: what the cache's TTL is measured against."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> Any:
        return utc_now() + self.offset


@pytest.fixture
def make(client_make: Callable[..., Setup]) -> Callable[..., Setup]:  # noqa: F811
    """test_client's setup (real governor, store and HTTP server) with a movable clock and a JSON reply."""

    def build(text: str, *, reply: str = '{"label": "positive"}') -> Setup:
        models = ("primary", "backup", "embedder")
        setup = client_make(text, models=models, default=ScriptedReply(content=reply))
        setup.governor.clock = Clock()
        return setup

    return build


def ask(setup: Setup, subject: Subject, content: str = "classify ticket 7", *, structured: bool = True,
        prompt_version: str = "labels@1", **request: Any) -> GovernedChatResult:  # fmt: skip
    if structured:
        request["output_schema"] = Label
    with setup.client(subject) as client:
        return client.chat(
            ChatRequest(messages=[{"role": "user", "content": content}], model="primary", **request),
            prompt_version=prompt_version,
        )


def chat_sent(setup: Setup) -> int:
    return len(setup.server.chat_requests)


def cache_rows(setup: Setup) -> list[dict[str, Any]]:
    ResponseCache(setup.engine)  # the table exists even when nothing was stored
    with setup.engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(response_cache_table.select())]


# -- hit, miss, cost -----------------------------------------------------------------------------------------


def test_the_next_run_is_answered_from_the_cache_without_sending_reserving_or_paying(make):
    setup = make(cache_policy(budget=budget_yaml(100_000).replace("period: run", "period: day")))
    first = ask(setup, RUN_1)
    assert first.cache == "miss" and chat_sent(setup) == 1
    assert first.to_xcom()["governance"]["cache"] == "miss"
    spent_after_first = setup.budget().spent_tokens
    assert spent_after_first > 0

    with setup.client(RUN_2) as client:
        second = client.chat(
            ChatRequest(messages=[{"role": "user", "content": "classify ticket 7"}], model="primary",
                        output_schema=Label),
            prompt_version="labels@1",
        )  # fmt: skip
        assert client.budget.reservations == 0 and client.paid_requests == 0 and client.cache_hits == 1
    assert chat_sent(setup) == 1  # nothing left for the model
    assert second.cache == "hit" and second.result.output == first.result.output == {"label": "positive"}
    xcom = second.to_xcom()
    assert xcom["governance"]["cache"] == "hit"
    assert xcom["cost_usd"] == 0 and xcom["usage"]["total_tokens"] == 0
    status = setup.budget()
    assert (status.spent_tokens, status.reserved_tokens) == (spent_after_first, 0)
    (hit,) = setup.records("model.cache_hit")
    assert (hit.decision, hit.outcome, hit.cost_usd, hit.prompt_tokens, hit.completion_tokens) == (
        "allow", "cache_hit", 0.0, 0, 0,
    )  # fmt: skip
    assert (hit.run_id, hit.rule, hit.prompt_version, hit.extra["cache_rule"]) == (
        "nightly-2", "cached-rule", "labels@1", "cached-rule",
    )  # fmt: skip
    assert len(setup.records("model.call")) == 1  # only the first run paid
    assert setup.governor.audit.verify().ok


def test_a_cache_hit_is_a_metric(make):
    setup = make(cache_policy())
    ask(setup, RUN_1)
    ask(setup, RUN_2)
    sink = RecordingSink()
    MetricsObserver(sink)(
        [AuditRecord.model_validate(r.model_dump()) for r in setup.records("model.cache_hit")]
    )
    assert sink.counts == [("governed_ai.cache.hits", 1, "primary", "chat")]


class RecordingSink:
    """A metrics sink that keeps what it was given (a fake for Airflow's Stats)."""

    def __init__(self) -> None:
        self.counts: list[tuple[str, int, str, str]] = []

    def incr(self, stat: str, count: int = 1, *, tags: dict[str, Any] | None = None) -> None:
        tags = tags or {}
        self.counts.append((stat, count, tags.get("model", ""), tags.get("kind", "")))

    def timing(self, stat: str, ms: float, *, tags: dict[str, Any] | None = None) -> None:
        pass


def test_an_entry_older_than_the_policys_ttl_is_a_miss(make):
    setup = make(cache_policy(ttl=600))
    ask(setup, RUN_1)
    setup.governor.clock.offset = timedelta(seconds=599)  # type: ignore[attr-defined]
    assert ask(setup, RUN_2).cache == "hit" and chat_sent(setup) == 1
    setup.governor.clock.offset = timedelta(seconds=601)  # type: ignore[attr-defined]
    assert ask(setup, RUN_3).cache == "miss" and chat_sent(setup) == 2


def test_a_shorter_ttl_in_the_policy_applies_to_replies_stored_before(make):
    setup = make(cache_policy(ttl=86_400))
    ask(setup, RUN_1)
    setup.governor.clock.offset = timedelta(hours=2)  # type: ignore[attr-defined]
    setup.governor.policy = FixedPolicy(engine_from_text(cache_policy(ttl=3600)))
    assert ask(setup, RUN_2).cache == "miss" and chat_sent(setup) == 2


@pytest.mark.parametrize(
    "change",
    [
        {"prompt_version": "labels@2"},
        {"content": "classify ticket 8"},
        {"max_tokens": 99},
    ],
)
def test_another_prompt_version_input_or_setting_is_a_miss(make, change):
    setup = make(cache_policy())
    ask(setup, RUN_1)
    assert ask(setup, RUN_2, **change).cache == "miss"
    assert chat_sent(setup) == 2


def test_a_retry_of_the_same_task_instance_is_replayed_by_the_journal_not_the_cache(make):
    setup = make(cache_policy())
    ask(setup, RUN_1)
    retried = ask(setup, RUN_1.model_copy(update={"try_number": 2}))
    assert retried.replayed and retried.cache is None
    assert setup.records("model.cache_hit") == [] and len(setup.records("model.replay")) == 1


# -- governance first ----------------------------------------------------------------------------------------


def test_a_revoked_grant_denies_although_a_cached_answer_exists(make):
    setup = make(cache_policy())
    ask(setup, RUN_1)
    setup.governor.policy = FixedPolicy(engine_from_text("version: 1\nrules: []\n"))
    with pytest.raises(GovernanceDenied):
        ask(setup, RUN_2)
    assert setup.records("model.cache_hit") == []
    assert setup.records("model.authorize")[-1].decision == "deny"


def test_without_a_cache_rule_nothing_is_stored_or_reused(make):
    setup = make(cache_policy(cache=""))
    first = ask(setup, RUN_1)
    ask(setup, RUN_2)
    assert chat_sent(setup) == 2 and first.cache is None
    assert "cache" not in first.to_xcom()["governance"]
    assert cache_rows(setup) == []


def test_a_rule_caches_only_models_it_names(make):
    setup = make(cache_policy())
    for subject in (RUN_1, RUN_2):
        with setup.client(subject) as client:
            client.chat(ChatRequest(messages=[{"role": "user", "content": "x"}], model="backup",
                                    output_schema=Label))  # fmt: skip
    assert chat_sent(setup) == 2 and cache_rows(setup) == []


# -- what is cached ------------------------------------------------------------------------------------------


def test_structured_only_leaves_plain_replies_uncached_and_all_caches_them(make):
    structured = make(cache_policy(outputs="structured"), reply="a plain answer")
    assert ask(structured, RUN_1, structured=False).cache is None
    ask(structured, RUN_2, structured=False)
    assert chat_sent(structured) == 2

    everything = make(cache_policy(outputs="all"), reply="a plain answer")
    ask(everything, RUN_1, structured=False)
    again = ask(everything, RUN_2, structured=False)
    assert again.cache == "hit" and again.result.content == "a plain answer" and chat_sent(everything) == 1


def test_a_reply_that_failed_validation_is_never_cached(make):
    setup = make(cache_policy())
    setup.server.script("not json", '{"label": "negative"}')
    repaired = ask(setup, RUN_1, max_repair_attempts=1)
    assert repaired.result.output == {"label": "negative"} and chat_sent(setup) == 2
    (stored,) = cache_rows(setup)  # the repaired request's valid reply; the invalid one is not stored
    assert "not json" not in stored["result"]

    setup.server.script("still not json", "nor this")
    with pytest.raises(StructuredOutputError):
        ask(setup, RUN_2, content="another ticket", max_repair_attempts=1)
    assert len(cache_rows(setup)) == 1


def test_the_cache_holds_redacted_replies_and_no_prompt_text_even_when_outputs_are_not_redacted(make):
    setup = make(cache_policy(redact_outputs=False), reply=f'{{"label": "mail {EMAIL} about {TICKET}"}}')
    prompt = f"Customer {EMAIL} paid with {CARD}, ticket {TICKET}."
    first = ask(setup, RUN_1, content=prompt)
    assert EMAIL in str(first.result.output)  # this policy lets the output through unredacted ...
    rows = cache_rows(setup)
    assert len(rows) == 1
    dumped = repr(rows)
    for canary in (EMAIL, CARD, TICKET, "Customer", "paid with"):
        assert canary not in dumped  # ... but the cache keeps only redacted text and no prompt
    with sqlite3.connect(setup.engine.url.database) as raw:
        (raw_text,) = raw.execute(
            "SELECT group_concat(key_sha256 || resource || coalesce(prompt_version, '') || result) "
            "FROM governed_ai_response_cache"
        ).fetchone()
    assert EMAIL not in raw_text and TICKET not in raw_text and "[REDACTED:EMAIL]" in raw_text
    second = ask(setup, RUN_2, content=prompt)
    assert second.cache == "hit" and EMAIL not in str(second.to_xcom())


# -- embeddings ----------------------------------------------------------------------------------------------


def test_embeddings_of_unchanged_chunks_come_from_the_cache(make):
    setup = make(cache_policy())
    texts = [f"chunk about {EMAIL}", "another chunk"]
    with setup.client(RUN_1) as client:
        first = client.embed(texts, model="embedder")
    with setup.client(RUN_2) as client:
        second = client.embed(texts, model="embedder")
        changed = client.embed([*texts, "a new chunk"], model="embedder")
    embeds = [p for p in setup.server.paths if "embed" in p]
    assert len(embeds) == 2  # the first run and the changed input; the unchanged one was not sent
    assert second.cached and not first.cached and not changed.cached
    assert (second.vectors == first.vectors).all() and second.cost_usd == 0 and second.prompt_tokens == 0
    (hit,) = setup.records("embedding.cache_hit")
    assert (hit.outcome, hit.cost_usd, hit.extra["inputs"]) == ("cache_hit", 0.0, 2)
    assert EMAIL not in repr(cache_rows(setup))


# -- purge ---------------------------------------------------------------------------------------------------


def test_purge_by_prompt_version_and_by_age(make):
    setup = make(cache_policy())
    ask(setup, RUN_1, prompt_version="labels@1")
    ask(setup, RUN_1, prompt_version="labels@2")
    cache = ResponseCache(setup.engine)
    assert cache.purge(prompt_version="labels@1") == 1
    assert [g.prompt_version for g in cache.status()] == ["labels@2"]
    assert ask(setup, RUN_2, prompt_version="labels@1").cache == "miss"
    assert cache.purge(older_than=timedelta(days=7)) == 0
    later = ResponseCache(setup.engine, clock=lambda: utc_now() + timedelta(days=8))
    assert later.purge(older_than=timedelta(days=7)) == 2
    assert cache.status() == []


@pytest.mark.parametrize(("text", "seconds"), [("7d", 604_800), ("12h", 43_200), ("30m", 1_800), ("45", 45)])
def test_ages_are_read_with_units(text, seconds):
    assert parse_age(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "d", "seven days", "-1d"])
def test_a_bad_age_says_what_was_expected(text):
    with pytest.raises(ValueError, match="7d"):
        parse_age(text)


# -- the policy key ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "fragment"),
    [
        ('{models: ["m"], ttl_seconds: 0}', "greater than 0"),
        ('{models: ["m"], ttl_seconds: "60"}', "integer"),
        ("{models: [], ttl_seconds: 60}", "empty list"),
        ('{models: ["m"], ttl_seconds: 60, outputs: some}', "structured"),
        ('{models: ["m"], ttl_seconds: 60, per_task: true}', "per_task"),
        ("{ttl_seconds: 60}", "models"),
    ],
)
def test_a_malformed_cache_key_is_a_policy_error(block, fragment):
    text = "version: 1\nrules:\n  - name: r\n    cache: " + block + "\n"
    with pytest.raises(PolicyError, match=fragment):
        load_policy_text(text)


def test_the_engine_answers_cache_settings_from_the_first_rule_that_caches_a_model_it_grants():
    engine = engine_from_text(
        "version: 1\nrules:\n"
        "  - name: no-grant\n    cache: {models: ['*'], ttl_seconds: 5}\n"
        "  - name: grants\n    models: [{connection: llm, model: 'small*'}]\n"
        "    cache: {models: ['small*'], ttl_seconds: 60, outputs: all}\n"
        "  - name: later\n    models: [{connection: llm, model: 'small*'}]\n"
        "    cache: {models: ['*'], ttl_seconds: 999}\n"
    )
    subject = RUN_1
    settings = engine.cache_for(subject, "llm", "small-1")
    assert settings is not None and (settings.rule, settings.ttl_seconds, settings.outputs) == (
        "grants",
        60,
        "all",
    )
    assert engine.cache_for(subject, "other-connection", "small-1") is None
    assert engine.cache_for(subject, "llm", "large") is None
    assert engine_from_text("version: 1\nrules: []\n").cache_for(subject, "llm", "small-1") is None


# -- the table on both backends ------------------------------------------------------------------------------


def test_the_cache_table_stores_replaces_expires_and_purges_on_each_backend(store_engine):
    """Writes as the store writer makes them (an upsert in its transaction), read back by lookups."""
    from governed_ai.core.response_cache import CacheWrite, apply_cache_writes
    from governed_ai.core.sqlstore import write_transaction

    cache = ResponseCache(store_engine)
    now = utc_now()

    def store(key: str, result: dict[str, Any], version: str, when: Any) -> None:
        with write_transaction(store_engine) as connection:
            apply_cache_writes(connection, [CacheWrite(key, "chat", "llm/m", version, "r", result)], now=when)

    store("k" * 64, {"answer": 1}, "p@1", now - timedelta(hours=3))
    assert cache.lookup("k" * 64, ttl_seconds=3600) is None  # stored 3 h ago, TTL 1 h
    assert cache.lookup("k" * 64, ttl_seconds=4 * 3600).result == {"answer": 1}  # type: ignore[union-attr]
    store("k" * 64, {"answer": 2}, "p@1", now)  # the same request answered again: replaced, TTL restarts
    hit = cache.lookup("k" * 64, ttl_seconds=3600)
    assert hit is not None and hit.result == {"answer": 2} and hit.rule == "r"
    store("j" * 64, {"answer": 3}, "p@2", now - timedelta(days=9))
    assert [(g.prompt_version, g.entries) for g in cache.status()] == [("p@1", 1), ("p@2", 1)]
    assert cache.purge(older_than=timedelta(days=7), prompt_version="p@1") == 0  # both must match
    assert cache.purge(older_than=timedelta(days=7)) == 1
    assert cache.purge() == 1 and cache.status() == []


def test_entries_are_shared_by_the_tasks_of_one_rule_never_across_rules(make):
    two_rules = "version: 1\nrules:\n" + "".join(
        f"  - name: team-{team}\n"
        f'    match: {{dag_id: "unit_{team}*"}}\n'
        "    models: [{connection: llm, model: primary}]\n"
        "    cache: {models: [primary], ttl_seconds: 3600}\n"
        for team in ("a", "b")
    )
    setup = make(two_rules)
    team_a = [Subject(dag_id=f"unit_a{n}", task_id="t", run_id="r") for n in (1, 2)]
    team_b = Subject(dag_id="unit_b1", task_id="t", run_id="r")
    ask(setup, team_a[0])
    assert ask(setup, team_a[1]).cache == "hit"  # another DAG of the same rule
    assert ask(setup, team_b).cache == "miss"  # the same question under another rule
    assert chat_sent(setup) == 2
