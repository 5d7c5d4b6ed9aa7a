"""Policy decisions: the allow/deny matrix, tool argument constraints, routing, redaction and budgets."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from governed_ai.core.policy import PolicyEngine, engine_from_text, load_policy_text
from governed_ai.core.subject import Subject

SOURCE = "/opt/policies/governance.yaml"

MATRIX_POLICY = """\
version: 1
rules:
  - name: support
    match:
      dag_id: "support_*"
      tags: ["support"]
    models:
      - {connection: llm_default, model: "smollm2*", max_tokens_per_call: 512}
    tools:
      - name: lookup_order
    collections:
      - {name: "kb_*", read: true}
  - name: ingest
    match:
      dag_id: kb_ingest
      owner: ai-platform
    models:
      - {connection: llm_default, model: smollm2}
    collections:
      - {name: "kb_*", read: true, write: true}
  - name: summaries
    match:
      task_id: "summarize_*"
    models:
      - {connection: "*", model: tiny}
    tools:
      - name: "report_*"
"""

SUBJECTS = {
    "support tagged": Subject(dag_id="support_triage", task_id="classify", tags=frozenset({"support"})),
    "support untagged": Subject(dag_id="support_triage", task_id="classify"),
    "support other dag": Subject(
        dag_id="support_escalate", task_id="x", tags=frozenset({"urgent", "support"})
    ),
    "ingest platform": Subject(dag_id="kb_ingest", task_id="load", owner="ai-platform"),
    "ingest intruder": Subject(dag_id="kb_ingest", task_id="load", owner="intruder"),
    "ingest prefix dag": Subject(dag_id="kb_ingest_v2", task_id="load", owner="ai-platform"),
    "summary task": Subject(dag_id="reports", task_id="summarize_day"),
    "summary in support": Subject(
        dag_id="support_triage", task_id="summarize_x", tags=frozenset({"support"})
    ),
}

# resource name -> (kind, args)
RESOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "model smollm2": ("model", ("llm_default", "smollm2")),
    "model smollm2-q8": ("model", ("llm_default", "smollm2-q8")),
    "model smollm2 other conn": ("model", ("other_conn", "smollm2")),
    "model tiny": ("model", ("any_conn", "tiny")),
    "tool lookup_order": ("tool", ("lookup_order",)),
    "tool delete_order": ("tool", ("delete_order",)),
    "tool report_daily": ("tool", ("report_daily",)),
    "read kb_docs": ("collection", ("kb_docs", "read")),
    "write kb_docs": ("collection", ("kb_docs", "write")),
    "read secrets": ("collection", ("secrets", "read")),
}

# subject -> {resource: granting rule}; everything not listed must be denied.
EXPECTED: dict[str, dict[str, str]] = {
    "support tagged": {
        "model smollm2": "support",
        "model smollm2-q8": "support",
        "tool lookup_order": "support",
        "read kb_docs": "support",
    },
    "support untagged": {},
    "support other dag": {
        "model smollm2": "support",
        "model smollm2-q8": "support",
        "tool lookup_order": "support",
        "read kb_docs": "support",
    },
    "ingest platform": {"model smollm2": "ingest", "read kb_docs": "ingest", "write kb_docs": "ingest"},
    "ingest intruder": {},
    "ingest prefix dag": {},
    "summary task": {"model tiny": "summaries", "tool report_daily": "summaries"},
    "summary in support": {
        "model smollm2": "support",
        "model smollm2-q8": "support",
        "model tiny": "summaries",
        "tool lookup_order": "support",
        "tool report_daily": "summaries",
        "read kb_docs": "support",
    },
}


@pytest.fixture(scope="module")
def matrix_engine() -> PolicyEngine:
    return PolicyEngine(load_policy_text(MATRIX_POLICY, source=SOURCE), source=SOURCE)


@pytest.mark.parametrize("resource", list(RESOURCES))
@pytest.mark.parametrize("subject_name", list(SUBJECTS))
def test_allow_deny_matrix(matrix_engine: PolicyEngine, subject_name: str, resource: str) -> None:
    subject = SUBJECTS[subject_name]
    kind, args = RESOURCES[resource]
    if kind == "model":
        decision = matrix_engine.authorize_model(subject, args[0], args[1])
        assert decision.resource == f"{args[0]}/{args[1]}"
    elif kind == "tool":
        decision = matrix_engine.authorize_tool(subject, args[0], {})
        assert decision.resource == args[0]
    else:
        decision = matrix_engine.authorize_collection(
            subject, args[0], "read" if args[1] == "read" else "write"
        )
        assert decision.action == f"collection.{args[1]}"
        assert decision.resource == args[0]

    expected_rule = EXPECTED[subject_name].get(resource)
    assert decision.allowed is (expected_rule is not None), decision.reason
    assert decision.rule == expected_rule
    if expected_rule is None:
        # A denial says who asked for what and how to grant it.
        assert f"dag {subject.dag_id!r} task {subject.task_id!r}" in decision.reason
        assert f"add a rule matching dag_id {subject.dag_id!r}" in decision.reason
        assert SOURCE in decision.reason
    else:
        assert expected_rule in decision.reason


def test_model_decision_reports_first_granting_rule_and_its_token_cap() -> None:
    engine = engine_from_text(
        """\
version: 1
rules:
  - name: first
    match: {dag_id: d}
    models: [{connection: c, model: "m*", max_tokens_per_call: 100}]
  - name: second
    models: [{connection: c, model: m1, max_tokens_per_call: 900}]
  - name: third
    models: [{connection: c, model: other}]
"""
    )
    in_d = Subject(dag_id="d", task_id="t")
    elsewhere = Subject(dag_id="e", task_id="t")
    first = engine.authorize_model(in_d, "c", "m1")
    assert (first.rule, first.max_tokens_per_call) == ("first", 100)
    second = engine.authorize_model(elsewhere, "c", "m1")
    assert (second.rule, second.max_tokens_per_call) == ("second", 900)
    uncapped = engine.authorize_model(elsewhere, "c", "other")
    assert (uncapped.rule, uncapped.max_tokens_per_call) == ("third", None)
    assert engine.matching_rules(in_d) == ["first", "second", "third"]
    assert engine.matching_rules(elsewhere) == ["second", "third"]


def test_denial_hints_differ_for_no_matching_rule_and_a_wrong_mode(matrix_engine: PolicyEngine) -> None:
    nobody = matrix_engine.authorize_model(SUBJECTS["ingest intruder"], "llm_default", "smollm2")
    assert "no rule matches this task" in nobody.reason
    assert "models: [{connection: 'llm_default', model: 'smollm2'}]" in nobody.reason

    write = matrix_engine.authorize_collection(SUBJECTS["support tagged"], "kb_docs", "write")
    assert "grant the collection, but not for write" in write.reason
    assert "collections: [{name: 'kb_docs', write: true}]" in write.reason


def test_decisions_are_frozen_and_not_shared_between_subjects(matrix_engine: PolicyEngine) -> None:
    allowed = matrix_engine.authorize_model(SUBJECTS["ingest platform"], "llm_default", "smollm2")
    denied = matrix_engine.authorize_model(SUBJECTS["ingest intruder"], "llm_default", "smollm2")
    assert allowed.allowed and not denied.allowed
    # Same task identity, different run/try: the same answer.
    retry = SUBJECTS["ingest platform"].model_copy(update={"run_id": "other", "try_number": 3})
    assert matrix_engine.authorize_model(retry, "llm_default", "smollm2").allowed
    with pytest.raises(dataclasses.FrozenInstanceError):
        allowed.allowed = False  # type: ignore[misc]


# -- tool argument constraints ----------------------------------------------------------------------------

TOOL_POLICY = """\
version: 1
rules:
  - name: strict
    tools:
      - name: lookup_order
        allow_other_args: false
        args:
          order_id: {regex: "[A-Z]{2}[0-9]{6}", max_length: 8, required: true}
          region: {enum: [eu, us]}
          limit: {min: 1, max: 50}
          ratio: {type: number, min: 0, max: 1}
          count: {type: integer}
          code: {enum: [1, 2]}
          note: {min_length: 2, max_length: 5}
          sku: {regex: "[A-Z]{3}"}
"""

BASE_ARGS: dict[str, object] = {"order_id": "AB123456"}

TOOL_CASES: list[tuple[str, dict[str, object], bool, str]] = [
    ("baseline", {}, True, ""),
    ("max_length boundary", {"order_id": "ZZ000000"}, True, ""),
    ("regex one char short", {"order_id": "AB12345"}, False, "must fully match regex"),
    ("regex lowercase letter", {"order_id": "Ab123456"}, False, "must fully match regex"),
    ("regex letter for digit", {"order_id": "AB12345X"}, False, "must fully match regex"),
    ("max_length plus one", {"order_id": "AB1234567"}, False, "at most 8 characters, got 9"),
    ("trailing newline", {"order_id": "AB12345\n"}, False, "must fully match regex"),
    ("regex exact", {"sku": "ABC"}, True, ""),
    ("regex matches only a prefix", {"sku": "ABCD"}, False, "must fully match regex '[A-Z]{3}'"),
    ("regex matches only a suffix", {"sku": "1ABC"}, False, "must fully match regex"),
    ("regex on a number", {"order_id": 12345678}, False, "must be a string, got int"),
    ("null instead of a string", {"order_id": None}, False, "must be a string, got NoneType"),
    ("enum exact", {"region": "us"}, True, ""),
    ("enum case differs", {"region": "EU"}, False, "must be one of ['eu', 'us']"),
    ("enum trailing space", {"region": "eu "}, False, "must be one of"),
    ("range lower bound inclusive", {"limit": 1}, True, ""),
    ("range upper bound inclusive", {"limit": 50}, True, ""),
    ("range float inside", {"limit": 49.5}, True, ""),
    ("range below", {"limit": 0}, False, "must be >= 1, got 0"),
    ("range above", {"limit": 51}, False, "must be <= 50, got 51"),
    ("range just above", {"limit": 50.000001}, False, "must be <= 50"),
    ("range given a string", {"limit": "5"}, False, "must be a number, got str"),
    ("range given a bool", {"limit": True}, False, "must be a number, got bool"),
    ("range given NaN", {"limit": math.nan}, False, "NaN"),
    ("typed number ok", {"ratio": 0.5}, True, ""),
    ("typed number int ok", {"ratio": 1}, True, ""),
    ("typed number given str", {"ratio": "0.5"}, False, "must be of type number, got str"),
    ("typed integer given float", {"count": 2.0}, False, "must be of type integer, got float"),
    ("typed integer given bool", {"count": False}, False, "must be of type integer, got bool"),
    ("typed integer ok", {"count": 7}, True, ""),
    ("numeric enum ok", {"code": 2}, True, ""),
    ("numeric enum given string", {"code": "2"}, False, "must be one of [1, 2]"),
    ("numeric enum given bool", {"code": True}, False, "must be one of [1, 2]"),
    ("min_length boundary", {"note": "ab"}, True, ""),
    ("min_length minus one", {"note": "a"}, False, "at least 2 characters, got 1"),
    ("max_length boundary note", {"note": "abcde"}, True, ""),
    ("max_length plus one note", {"note": "abcdef"}, False, "at most 5 characters, got 6"),
    ("unlisted argument", {"debug": True}, False, "argument 'debug' is not allowed"),
]


@pytest.mark.parametrize(
    ("overrides", "allowed", "fragment"),
    [case[1:] for case in TOOL_CASES],
    ids=[case[0] for case in TOOL_CASES],
)
def test_tool_argument_constraints(overrides: dict[str, object], allowed: bool, fragment: str) -> None:
    engine = engine_from_text(TOOL_POLICY, source=SOURCE)
    arguments = {**BASE_ARGS, **overrides}
    decision = engine.authorize_tool(Subject(dag_id="d", task_id="t"), "lookup_order", arguments)
    assert decision.allowed is allowed, decision.reason
    if allowed:
        assert decision.rule == "strict"
    else:
        assert decision.rule is None
        assert fragment in decision.reason
        assert "rule 'strict'" in decision.reason
        assert SOURCE in decision.reason


def test_required_argument_absent_is_denied() -> None:
    engine = engine_from_text(TOOL_POLICY)
    decision = engine.authorize_tool(Subject(dag_id="d", task_id="t"), "lookup_order", {"region": "eu"})
    assert not decision.allowed
    assert "argument 'order_id' is required" in decision.reason


def test_a_later_rule_can_grant_what_an_earlier_rule_constrains() -> None:
    engine = engine_from_text(
        """\
version: 1
rules:
  - name: narrow
    tools: [{name: search, args: {limit: {max: 10}}}]
  - name: wide-for-admins
    match: {owner: admin}
    tools: [{name: search, args: {limit: {max: 1000}}}]
"""
    )
    admin = Subject(dag_id="d", task_id="t", owner="admin")
    user = Subject(dag_id="d", task_id="t", owner="user")
    assert engine.authorize_tool(admin, "search", {"limit": 5}).rule == "narrow"
    assert engine.authorize_tool(admin, "search", {"limit": 500}).rule == "wide-for-admins"
    denied = engine.authorize_tool(user, "search", {"limit": 500})
    assert not denied.allowed
    assert "rule 'narrow': argument 'limit' must be <= 10, got 500" in denied.reason
    assert engine.authorize_tool(user, "search", {"limit": 500, "extra": "unconstrained"}).allowed is False
    assert engine.authorize_tool(user, "search", {"limit": 5, "extra": "unconstrained"}).allowed


# -- model routing ----------------------------------------------------------------------------------------

ROUTING_POLICY = """\
version: 1
rules:
  - name: analytics
    match: {dag_id: "a*"}
    model_routes:
      default: {model: m-big, fallbacks: [m-small, m-tiny]}
    models:
      - {connection: c1, model: m-small}
      - {connection: c1, model: m-tiny}
      - {connection: c2, model: m-big}
  - name: everyone
    model_routes:
      default: {model: z}
      cheap: {model: m-tiny, fallbacks: [m-tiny, m-small]}
    models:
      - {connection: "*", model: m-tiny}
"""


@pytest.mark.parametrize(
    ("dag_id", "connection", "requested", "expected"),
    [
        ("abc", "c1", "default", ["m-small", "m-tiny"]),  # first matching rule's route, filtered by grants
        ("abc", "c2", "default", ["m-big", "m-tiny"]),  # m-small is granted on c1 only
        ("abc", "c1", "cheap", ["m-tiny", "m-small"]),  # alias only in the second rule; duplicates dropped
        ("abc", "c1", "m-small", ["m-small"]),  # not an alias: its own only candidate
        ("abc", "c2", "m-small", []),
        ("abc", "c1", "unknown", []),
        ("xyz", "c1", "default", []),  # route to z, which nobody grants: denial
        ("xyz", "c9", "cheap", ["m-tiny"]),
    ],
)
def test_resolve_model(dag_id: str, connection: str, requested: str, expected: list[str]) -> None:
    engine = engine_from_text(ROUTING_POLICY)
    subject = Subject(dag_id=dag_id, task_id="t")
    assert engine.resolve_model(subject, connection, requested) == expected
    for model in expected:
        assert engine.authorize_model(subject, connection, model).allowed


# -- redaction --------------------------------------------------------------------------------------------


def test_redaction_is_the_union_of_defaults_and_matching_rules() -> None:
    engine = engine_from_text(
        """\
version: 1
defaults: {redact_prompts: false, redact_outputs: false, store_content: true}
rules:
  - name: tighten
    match: {tags: [pii]}
    redaction:
      prompts: true
      custom_patterns: [{name: ticket, regex: "TKT-[0-9a-f]{16}"}]
  - name: patterns
    redaction:
      outputs: true
      custom_patterns:
        - {name: ticket, regex: "TKT-[0-9a-f]{16}"}
        - {name: employee, regex: "EMP[0-9]{5}"}
  - name: cannot-loosen
    match: {tags: [pii]}
    redaction: {prompts: false, outputs: false}
"""
    )
    pii = Subject(dag_id="d", task_id="t", tags=frozenset({"pii"}))
    plain = Subject(dag_id="d", task_id="t")
    pii_settings = engine.redaction_for(pii)
    assert (pii_settings.prompts, pii_settings.outputs, pii_settings.store_content) == (True, True, True)
    assert [p.name for p in pii_settings.custom_patterns] == ["ticket", "employee"]
    assert pii_settings.custom_patterns[1].compiled.fullmatch("EMP12345")
    plain_settings = engine.redaction_for(plain)
    assert (plain_settings.prompts, plain_settings.outputs) == (False, True)
    assert [p.name for p in plain_settings.custom_patterns] == ["ticket", "employee"]
    assert engine.authorize_tool(pii, "none", {}).redaction == pii_settings


def test_output_item_keys_start_from_the_defaults_and_rules_can_only_make_them_stricter() -> None:
    engine = engine_from_text(
        """\
version: 1
defaults: {output_item_keys: allow_pii}
rules:
  - name: strict
    match: {task_id: strict}
    redaction: {output_item_keys: digest}
  - name: cannot-loosen
    match: {task_id: strict}
    redaction: {output_item_keys: allow_pii}
  - name: middle
    match: {task_id: middle}
    redaction: {output_item_keys: redacted}
"""
    )
    keys = {task: engine.redaction_for(Subject(dag_id="d", task_id=task)).output_item_keys for task in
            ("strict", "middle", "other")}  # fmt: skip
    assert keys == {"strict": "digest", "middle": "redacted", "other": "allow_pii"}
    assert engine_from_text("version: 1\n").redaction_for(
        Subject(dag_id="d", task_id="t")
    ).output_item_keys == ("redacted")
    assert PolicyEngine.deny_all("broken").redaction_for(
        Subject(dag_id="d", task_id="t")
    ).output_item_keys == ("digest")


# -- budgets ----------------------------------------------------------------------------------------------

BUDGET_POLICY = """\
version: 1
budgets:
  - {name: support-daily, scope: dag, match: {dag_id: "support_*"}, period: day, max_tokens: 1000}
  - {name: support-classify-run, scope: dag, match: {dag_id: "support_*", task_id: classify}, period: run,
     max_cost_usd: 0.5}
  - {name: ai-team-monthly, scope: team, match: {owner: ai-team}, period: month, max_cost_usd: 20}
  - {name: finance-tag-daily, scope: team, match: {tags: [finance]}, period: day, max_tokens: 50}
  - {name: global-monthly, scope: global, period: month, max_tokens: 1000000, max_cost_usd: 100}
"""


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (
            Subject(dag_id="support_triage", task_id="classify", owner="ai-team"),
            ["support-daily", "support-classify-run", "ai-team-monthly", "global-monthly"],
        ),
        (Subject(dag_id="support_triage", task_id="load"), ["support-daily", "global-monthly"]),
        (
            Subject(dag_id="billing", task_id="x", tags=frozenset({"finance", "eu"})),
            ["finance-tag-daily", "global-monthly"],
        ),
        (Subject(dag_id="other", task_id="x"), ["global-monthly"]),
    ],
)
def test_budget_applicability(subject: Subject, expected: list[str]) -> None:
    engine = engine_from_text(BUDGET_POLICY)
    budgets = engine.budgets_for(subject, datetime(2026, 5, 17, 12, tzinfo=UTC))
    assert [b.name for b in budgets] == expected


def test_budgets_requiring_a_price_are_those_with_a_cost_limit_that_do_not_allow_the_model() -> None:
    engine = engine_from_text(
        BUDGET_POLICY.replace(
            "max_cost_usd: 20}", 'max_cost_usd: 20, allow_unpriced_models: ["local-*"]}'
        ).replace("max_cost_usd: 100}", 'max_cost_usd: 100, allow_unpriced_models: ["*"]}')
    )
    subject = Subject(dag_id="support_triage", task_id="classify", owner="ai-team")
    assert engine.budgets_requiring_price(subject, "gpt-4o") == ["support-classify-run", "ai-team-monthly"]
    assert engine.budgets_requiring_price(subject, "local-llama") == ["support-classify-run"]
    assert engine.budgets_requiring_price(Subject(dag_id="other", task_id="x"), "gpt-4o") == []


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


PLUS_TWO = timezone(timedelta(hours=2))
MINUS_FIVE = timezone(timedelta(hours=-5))

# now, day key, day reset, month key, month reset
PERIOD_CASES = [
    (utc(2025, 12, 31, 23, 59, 59, 999999), "2025-12-31", utc(2026, 1, 1), "2025-12", utc(2026, 1, 1)),
    (utc(2026, 1, 1), "2026-01-01", utc(2026, 1, 2), "2026-01", utc(2026, 2, 1)),
    (utc(2024, 2, 29, 8), "2024-02-29", utc(2024, 3, 1), "2024-02", utc(2024, 3, 1)),
    # 01:30 at UTC+2 on March 1st is still February 28th in UTC.
    (datetime(2026, 3, 1, 1, 30, tzinfo=PLUS_TWO), "2026-02-28", utc(2026, 3, 1), "2026-02", utc(2026, 3, 1)),
    # 20:00 at UTC-5 on January 31st is already February 1st in UTC.
    (datetime(2026, 1, 31, 20, tzinfo=MINUS_FIVE), "2026-02-01", utc(2026, 2, 2), "2026-02", utc(2026, 3, 1)),
]


@pytest.mark.parametrize(("now", "day_key", "day_reset", "month_key", "month_reset"), PERIOD_CASES)
def test_budget_period_keys_and_resets_are_utc_calendar_periods(
    now: datetime, day_key: str, day_reset: datetime, month_key: str, month_reset: datetime
) -> None:
    engine = engine_from_text(BUDGET_POLICY)
    subject = Subject(dag_id="support_triage", task_id="classify", owner="ai-team", run_id="scheduled__x")
    by_name = {b.name: b for b in engine.budgets_for(subject, now)}

    daily = by_name["support-daily"]
    assert daily.ledger_key == ("support-daily", day_key)
    assert daily.resets_at == day_reset
    assert daily.resets_at is not None and daily.resets_at.tzinfo is not None
    assert (daily.period, daily.scope, daily.max_tokens, daily.max_cost_usd) == ("day", "dag", 1000, None)

    monthly = by_name["ai-team-monthly"]
    assert monthly.ledger_key == ("ai-team-monthly", month_key)
    assert monthly.resets_at == month_reset

    per_run = by_name["support-classify-run"]
    assert per_run.ledger_key == ("support-classify-run", "scheduled__x")
    assert per_run.resets_at is None
    assert per_run.max_cost_usd == 0.5


def test_run_budget_key_follows_the_run_even_for_a_cached_task_identity() -> None:
    engine = engine_from_text(BUDGET_POLICY)
    first = Subject(dag_id="support_triage", task_id="classify", run_id="run-1")
    second = first.model_copy(update={"run_id": "run-2"})
    now = datetime(2026, 1, 1, tzinfo=UTC)
    keys = [
        next(b.period_key for b in engine.budgets_for(s, now) if b.name == "support-classify-run")
        for s in (first, second)
    ]
    assert keys == ["run-1", "run-2"]


def test_budgets_need_an_aware_timestamp() -> None:
    engine = engine_from_text(BUDGET_POLICY)
    with pytest.raises(ValueError, match="timezone-aware"):
        engine.budgets_for(Subject(dag_id="x", task_id="y"), datetime(2026, 1, 1))
    # Without a timestamp, the current UTC period is used (either side of a month boundary is fine).
    before = datetime.now(UTC)
    (only,) = engine.budgets_for(Subject(dag_id="x", task_id="y"))
    after = datetime.now(UTC)
    assert only.period_key in {before.strftime("%Y-%m"), after.strftime("%Y-%m")}


# -- identity the DAG author cannot choose: the DAG bundle ------------------------------------------------

BUNDLE_POLICY = """\
version: 1
rules:
  - name: privileged
    match: {bundle: "prod-*", owner: data-platform, tags: [privileged]}
    models: [{connection: llm, model: big-model}]
    tools: [{name: refund}]
  - name: everyone
    models: [{connection: llm, model: small-model}]
budgets:
  - name: prod-team
    scope: team
    match: {bundle: "prod-*"}
    period: day
    max_tokens: 1000
"""


def test_a_rule_that_matches_a_bundle_cannot_be_widened_by_owner_or_tags() -> None:
    engine = engine_from_text(BUNDLE_POLICY, source=SOURCE)
    honest = Subject(dag_id="etl", task_id="t", owner="alice", tags=frozenset({"etl"}), bundle="user-dags")
    # The same DAG claiming the privileged owner and tag, as DAG code may: still in its own bundle.
    claiming = honest.model_copy(update={"owner": "data-platform", "tags": frozenset({"privileged"})})
    unknown_bundle = claiming.model_copy(update={"bundle": None})
    trusted = claiming.model_copy(update={"bundle": "prod-core"})

    for subject in (honest, claiming, unknown_bundle):
        assert not engine.authorize_model(subject, "llm", "big-model").allowed
        assert not engine.authorize_tool(subject, "refund", {}).allowed
        assert engine.authorize_model(subject, "llm", "small-model").allowed  # nothing extra, nothing less
        assert engine.matching_rules(subject) == ["everyone"]
        assert engine.budgets_for(subject, datetime(2026, 11, 25, tzinfo=UTC)) == []
    assert engine.authorize_model(trusted, "llm", "big-model").rule == "privileged"
    assert engine.authorize_tool(trusted, "refund", {}).allowed
    assert [b.name for b in engine.budgets_for(trusted, datetime(2026, 11, 25, tzinfo=UTC))] == ["prod-team"]
    # A denial says which identity it judged, bundle included.
    assert "bundle 'user-dags'" in engine.authorize_model(claiming, "llm", "big-model").reason
