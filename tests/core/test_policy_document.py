"""Loading the policy file: validation, error messages that point at lines, and fail-closed hot reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from governed_ai.core.policy import (
    PolicyDocument,
    PolicyError,
    PolicyProvider,
    engine_from_text,
    load_policy_file,
    load_policy_text,
)
from governed_ai.core.subject import Subject

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO_ROOT / "example_dags" / "policies" / "governance_policy.yaml"

SUPPORT = Subject(
    dag_id="support_triage", task_id="classify", owner="support-ai", tags=frozenset({"support"})
)

VALID = """\
version: 1
rules:
  - name: support
    match: {dag_id: "support_*"}
    models:
      - {connection: llm, model: smollm2}
"""


def line_of(text: str, snippet: str, occurrence: int = 1) -> int:
    """1-based line number of the n-th line containing ``snippet``."""
    hits = [number for number, line in enumerate(text.splitlines(), start=1) if snippet in line]
    return hits[occurrence - 1]


def load_error(text: str, source: str = "/etc/policies/p.yaml") -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, source=source)
    return info.value


def test_example_policy_loads_and_grants_the_example_dag() -> None:
    document = load_policy_file(EXAMPLE_POLICY)
    assert {rule.name for rule in document.rules} >= {"support-triage"}
    engine = engine_from_text(EXAMPLE_POLICY.read_text(), source=str(EXAMPLE_POLICY))
    assert engine.load_error is None
    assert engine.authorize_model(SUPPORT, "governed_ai_llm_default", "smollm2").allowed


def test_string_or_list_globs_are_both_accepted() -> None:
    document = load_policy_text(VALID.replace('"support_*"', '["support_*", "ops_*"]'))
    assert document.rules[0].match.dag_id == ["support_*", "ops_*"]
    assert load_policy_text(VALID).rules[0].match.dag_id == ["support_*"]


# Each case: policy text, a snippet of the line the error must point at, the field path, message fragments.
ERROR_CASES = {
    "unknown key with suggestion": (
        """\
version: 1
rules:
  - name: r
    match:
      dag_id: x
      dagid: y
""",
        "dagid:",
        "rules[0].match.dagid",
        [
            "unknown key 'dagid'",
            "did you mean 'dag_id'",
            "expected one of: bundle, dag_id, owner, tags, task_id",
        ],
    ),
    "invalid regex": (
        """\
version: 1
rules:
  - name: r
    tools:
      - name: t
        args:
          order_id:
            regex: "[A-Z"
""",
        "regex:",
        "rules[0].tools[0].args.order_id.regex",
        ["invalid regular expression '[A-Z'", "expected a Python `re` pattern"],
    ),
    "invalid custom redaction pattern": (
        """\
version: 1
rules:
  - name: r
    redaction:
      custom_patterns:
        - {name: ticket, regex: "(unclosed"}
""",
        "name: ticket",
        "rules[0].redaction.custom_patterns[0].regex",
        ["invalid regular expression"],
    ),
    "custom pattern name without letters or digits": (
        """\
version: 1
rules:
  - name: r
    redaction:
      custom_patterns:
        - name: "__"
          regex: "x"
""",
        'name: "__"',
        "rules[0].redaction.custom_patterns[0].name",
        ["String should match pattern", "got '__'"],
    ),
    "duplicate rule names": (
        """\
version: 1
rules:
  - name: same
    models: [{connection: c, model: m}]
  - name: other
  - name: same
""",
        "name: same",
        "rules[2].name",
        ["duplicate name 'same'", "also rules[0]"],
    ),
    "budget without limit": (
        """\
version: 1
budgets:
  - name: b
    scope: global
    period: day
""",
        "- name: b",
        "budgets[0]",
        ["budget 'b' has no limit", "expected max_tokens and/or max_cost_usd"],
    ),
    "string where an integer is required": (
        """\
version: 1
rules:
  - name: r
    models:
      - connection: c
        model: m
        max_tokens_per_call: "512"
""",
        "max_tokens_per_call",
        "rules[0].models[0].max_tokens_per_call",
        ["valid integer", "got '512'"],
    ),
    "missing rule name": (
        """\
version: 1
rules:
  - name: fine
  - description: no name here
    models: [{connection: c, model: m}]
""",
        "- description",
        "rules[1].name",
        ["required key is missing"],
    ),
    "duplicate yaml key": (
        """\
version: 1
rules:
  - name: r
    models: [{connection: c, model: m}]
    models: [{connection: c, model: other}]
""",
        "models:",
        "rules[0].models",
        ["duplicate key 'models'", "first on line 4"],
    ),
    "yaml syntax error": (
        """\
version: 1
rules:
  - name: r
    match: {dag_id: [a, b}
""",
        "match:",
        "(yaml syntax)",
        ["expected valid YAML"],
    ),
    "unknown budget period": (
        """\
version: 1
budgets:
  - name: b
    scope: global
    period: week
    max_tokens: 10
""",
        "period: week",
        "budgets[0].period",
        ["'run', 'day' or 'month'", "got 'week'"],
    ),
    "global budget with match": (
        """\
version: 1
budgets:
  - name: b
    scope: global
    match: {dag_id: x}
    period: day
    max_tokens: 10
""",
        "match:",
        "budgets[0].match",
        ["global budget applies to everyone"],
    ),
    "team budget matching by dag": (
        """\
version: 1
budgets:
  - name: b
    scope: team
    match: {dag_id: x}
    period: day
    max_tokens: 10
""",
        "match:",
        "budgets[0].match",
        ["team budget needs match.owner, match.tags and/or match.bundle"],
    ),
    "yaml booleans in a string enum": (
        """\
version: 1
rules:
  - name: r
    tools:
      - name: t
        args:
          answer: {enum: [maybe, yes, no]}
""",
        "answer:",
        "rules[0].tools[0].args.answer.enum",
        ["mixes strings and booleans", "quote them"],
    ),
    "string and numeric constraints together": (
        """\
version: 1
rules:
  - name: r
    tools:
      - name: t
        args:
          limit:
            regex: "[0-9]+"
            max: 5
""",
        "max: 5",
        "rules[0].tools[0].args.limit.max",
        ["can never both hold"],
    ),
    "empty match list": (
        """\
version: 1
rules:
  - name: r
    match:
      tags: []
""",
        "tags:",
        "rules[0].match.tags",
        ["empty list matches nothing"],
    ),
    "unsupported version": (
        """\
version: 2
rules: []
""",
        "version: 2",
        "version",
        ["Input should be 1", "got 2"],
    ),
    "allow_unpriced_models without a cost limit": (
        """\
version: 1
budgets:
  - name: b
    scope: global
    period: day
    max_tokens: 10
    allow_unpriced_models: ["*"]
""",
        "allow_unpriced_models:",
        "budgets[0].allow_unpriced_models",
        ["no max_cost_usd", "remove it or add max_cost_usd"],
    ),
    "unknown output_item_keys mode": (
        """\
version: 1
defaults:
  output_item_keys: raw
""",
        "output_item_keys:",
        "defaults.output_item_keys",
        ["'allow_pii', 'redacted' or 'digest'", "got 'raw'"],
    ),
    "glob as route target": (
        """\
version: 1
rules:
  - name: r
    model_routes:
      default: {model: "smollm2*"}
""",
        "default:",
        "rules[0].model_routes.default.model",
        ["must be a concrete model name"],
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_load_errors_name_file_line_field_and_expectation(case: str) -> None:
    text, line_snippet, path, fragments = ERROR_CASES[case]
    occurrence = 2 if case in ("duplicate rule names", "duplicate yaml key") else 1
    expected_line = line_of(text, line_snippet, occurrence)

    error = load_error(text)

    assert error.source == "/etc/policies/p.yaml"
    matching = [issue for issue in error.issues if issue.path == path]
    assert matching, f"no issue at {path}: {error}"
    assert matching[0].line == expected_line, str(error)
    message = str(error)
    assert "/etc/policies/p.yaml" in message
    assert f"line {expected_line}, {path}" in message
    for fragment in fragments:
        assert fragment in message


def test_several_mistakes_are_reported_together_in_line_order() -> None:
    text = """\
version: 1
rules:
  - name: r
    colections: []
    models:
      - {connection: c, model: m, max_tokens_per_call: 0}
budgets:
  - {name: b, scope: everyone, period: day, max_tokens: 1}
"""
    error = load_error(text)
    assert [issue.line for issue in error.issues] == [
        line_of(text, "colections"),
        line_of(text, "max_tokens_per_call"),
        line_of(text, "scope: everyone"),
    ]
    assert "3 problems" in str(error)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "the file is empty"),
        ("- just\n- a list\n", "expected a mapping with `version: 1`"),
        ("rules: []\n", "version: required key is missing"),
        ("version: 1\n---\nversion: 1\n", "expected a single document"),
    ],
    ids=["empty", "not a mapping", "no version", "two documents"],
)
def test_structurally_wrong_files_are_errors(text: str, fragment: str) -> None:
    assert fragment in str(load_error(text))


def test_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy_file(missing)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy_file(binary)


def test_documents_built_in_python_are_validated_the_same_way() -> None:
    with pytest.raises(ValueError, match="duplicate name 'x'"):
        PolicyDocument.model_validate({"version": 1, "rules": [{"name": "x"}, {"name": "x"}]})
    document = PolicyDocument.model_validate(
        {"version": 1, "rules": [{"name": "x", "match": {"dag_id": "a"}}]}
    )
    assert document.rules[0].match.dag_id == ["a"]


# -- PolicyProvider: fail-closed hot reload ----------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.write_text(text)
    # Some filesystems keep mtime in whole seconds; make every write observable regardless.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_provider_denies_everything_while_the_file_is_broken_and_recovers_when_fixed(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write(policy, VALID)
    provider = PolicyProvider(policy, check_interval_seconds=0)
    assert provider.load_error is None
    assert provider.engine().authorize_model(SUPPORT, "llm", "smollm2").allowed

    write(policy, VALID.replace("models:", "modles:"))
    broken = provider.engine()
    decision = broken.authorize_model(SUPPORT, "llm", "smollm2")
    assert not decision.allowed
    assert provider.load_error is not None and "unknown key 'modles'" in provider.load_error
    assert str(policy) in decision.reason
    assert f"line {line_of(VALID, 'models:')}" in decision.reason
    assert "failed to load" in decision.reason
    assert not broken.authorize_tool(SUPPORT, "anything", {}).allowed
    assert not broken.authorize_collection(SUPPORT, "anything", "read").allowed
    assert broken.resolve_model(SUPPORT, "llm", "smollm2") == []
    assert broken.redaction_for(SUPPORT).prompts and broken.redaction_for(SUPPORT).outputs

    write(policy, VALID)
    assert provider.engine().authorize_model(SUPPORT, "llm", "smollm2").allowed
    assert provider.load_error is None


def test_provider_denies_everything_when_the_file_disappears(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write(policy, VALID)
    provider = PolicyProvider(policy, check_interval_seconds=0)
    policy.unlink()
    decision = provider.engine().authorize_model(SUPPORT, "llm", "smollm2")
    assert not decision.allowed
    assert "cannot read the policy file" in decision.reason


def test_provider_starting_on_a_broken_file_is_deny_all(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write(policy, "version: 1\nrules: {}\n")
    provider = PolicyProvider(policy)
    assert provider.load_error is not None and "valid list" in provider.load_error
    assert not provider.engine().authorize_model(SUPPORT, "llm", "smollm2").allowed


def test_provider_checks_the_file_at_most_once_per_interval(tmp_path: Path) -> None:
    now = [100.0]
    policy = tmp_path / "policy.yaml"
    write(policy, VALID)
    provider = PolicyProvider(policy, check_interval_seconds=30, clock=lambda: now[0])
    first = provider.engine()

    write(policy, VALID.replace("smollm2", "other-model"))
    now[0] += 29
    assert provider.engine() is first  # not re-checked yet
    now[0] += 1
    reloaded = provider.engine()
    assert reloaded is not first
    assert reloaded.authorize_model(SUPPORT, "llm", "other-model").allowed
    assert not reloaded.authorize_model(SUPPORT, "llm", "smollm2").allowed


def test_provider_keeps_the_engine_when_only_the_timestamp_changes(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write(policy, VALID)
    provider = PolicyProvider(policy, check_interval_seconds=0)
    first = provider.engine()
    write(policy, VALID)
    assert provider.refresh() is False
    assert provider.engine() is first
    assert provider.refresh(force=True) is True
    assert provider.engine() is not first


def test_provider_from_inline_text() -> None:
    assert PolicyProvider(text=VALID).engine().authorize_model(SUPPORT, "llm", "smollm2").allowed
    broken = PolicyProvider(text="version: 1\nrules: [{}]\n")
    assert broken.load_error is not None and "<inline policy>" in broken.load_error
    with pytest.raises(ValueError, match="exactly one"):
        PolicyProvider()


def test_decisions_carry_the_digest_of_the_policy_that_made_them(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write(policy, VALID)
    provider = PolicyProvider(policy, check_interval_seconds=0)
    before = provider.engine().authorize_model(SUPPORT, "llm", "smollm2").policy_digest
    write(policy, VALID + "# a comment changes the file, so the digest\n")
    after = provider.engine().authorize_model(SUPPORT, "llm", "smollm2").policy_digest
    assert len(before) == 64 and len(after) == 64
    assert before != after
