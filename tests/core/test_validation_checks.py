"""Each AI-output check, run by real Great Expectations: it catches what it should and passes the rest."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import BaseModel

from governed_ai.core.redaction import RedactionSettings
from governed_ai.core.validation import (
    Check,
    LengthCheck,
    ValidationSuite,
    conforms_to_schema,
    grounded,
    label_in_set,
    length_between,
    matches_regex,
    no_pii,
    not_empty,
    not_refusal,
    refusal_rate_at_most,
    run_suite,
)
from governed_ai.core.validation.runner import gx_runtime


class Classification(BaseModel):
    label: Literal["bug", "billing"]
    urgency: int


def suite_of(*checks: Check) -> ValidationSuite:
    return ValidationSuite(name="checks_under_test", checks=checks)


def failing(check: Check, rows: list[dict[str, Any]]) -> dict[int, list[str]]:
    """Row index -> reasons, for the rows Great Expectations found failing ``check``."""
    run = run_suite(suite_of(check), rows)
    return {index: list(reasons) for index, reasons in run.row_reasons.items()}


def column(name: str, *values: Any) -> list[dict[str, Any]]:
    return [{name: value} for value in values]


def test_not_empty_catches_missing_empty_and_blank_values():
    rows = [{"answer": "hi"}, {"answer": ""}, {"answer": "  \n"}, {"answer": None}, {}, {"answer": 0}]
    result = failing(not_empty("answer"), rows)
    assert sorted(result) == [1, 2, 3, 4]
    assert result[3] == ["not_empty:answer: missing"]
    assert result[1] == ["not_empty:answer: blank"]


def test_length_bounds_and_missing_values():
    rows = column("summary", "abcde", "abcdef", "", None)
    result = failing(length_between("summary", min_length=1, max_length=5), rows)
    assert sorted(result) == [1, 2, 3]
    assert result[1] == ["length:summary: 6 characters, expected 1 to 5"]
    assert result[3] == ["length:summary: missing"]
    relaxed = failing(LengthCheck(column="summary", max_length=5, allow_missing=True), rows)
    assert sorted(relaxed) == [1]


def test_label_in_allowed_set_names_the_wrong_label():
    rows = column("sentiment", "positive", "neutral", "negative", "Positive")
    result = failing(label_in_set("sentiment", ["positive", "negative"]), rows)
    assert sorted(result) == [1, 3]
    assert "'neutral' is not one of 'positive', 'negative'" in result[1][0]


def test_regex_is_a_search_unless_anchored():
    rows = column("ticket", "T-1001", "xT-1001", "T-10012", "t-1001")
    assert sorted(failing(matches_regex("ticket", r"T-\d{4}"), rows)) == [3]
    anchored = failing(matches_regex("ticket", r"^T-\d{4}$"), rows)
    assert sorted(anchored) == [1, 2, 3]
    assert "does not match the pattern ^T-\\d{4}$" in anchored[1][0]


@pytest.mark.parametrize(
    "check",
    [
        conforms_to_schema("output", model=Classification),
        conforms_to_schema("output", json_schema=Classification.model_json_schema()),
    ],
    ids=["pydantic", "json_schema"],
)
def test_schema_conformance_accepts_dicts_and_json_text(check):
    rows = column(
        "output",
        {"label": "bug", "urgency": 2},
        '{"label": "billing", "urgency": 1}',
        {"label": "feature", "urgency": 2},
        '{"label": "bug"',
        {"label": "bug"},
    )
    result = failing(check, rows)
    assert sorted(result) == [2, 3, 4]
    assert "label" in result[2][0]
    assert "urgency" in result[4][0]
    assert "JSON" in result[3][0] or "json" in result[3][0]


def test_schema_conformance_rate_uses_gx_mostly():
    rows = column("output", *([{"label": "bug", "urgency": 1}] * 9), {"label": "nope", "urgency": 1})
    tolerant = run_suite(suite_of(conforms_to_schema("output", model=Classification, mostly=0.9)), rows)
    strict = run_suite(suite_of(conforms_to_schema("output", model=Classification, mostly=0.95)), rows)
    assert tolerant.success and not strict.success
    # mostly decides the verdict; the failing row is identified either way.
    assert list(tolerant.row_reasons) == list(strict.row_reasons) == [9]


def test_no_pii_uses_the_governance_redactor_detectors():
    rows = column(
        "answer",
        "Your order shipped on Monday.",
        "Write to jane.doe@example.com for a refund.",
        "Call +1 415 555 0100 tomorrow.",
        {"reply": {"card": "4111 1111 1111 1111"}},
        "Use token ghp_0123456789abcdefghijABCDEFGHIJ012345 to deploy.",
        None,
    )
    result = failing(no_pii("answer"), rows)
    assert sorted(result) == [1, 2, 3, 4]
    assert result[1] == ["no_pii:answer: contains EMAIL"]
    assert "PHONE" in result[2][0] and "PAYMENT_CARD" in result[3][0] and "SECRET" in result[4][0]


def test_no_pii_detectors_follow_redaction_settings():
    rows = column("answer", "Write to jane.doe@example.com", "TKT-0123456789abcdef leaked")
    settings = RedactionSettings(emails=False, custom_patterns=[("ticket_secret", r"TKT-[0-9a-f]{16}")])
    result = failing(no_pii("answer", redaction=settings), rows)
    assert sorted(result) == [1]
    assert "TICKET_SECRET" in result[1][0]


def test_grounded_requires_a_retrieved_document_to_be_cited():
    rows = [
        {"cited": ["doc-1"], "retrieved": ["doc-1", "doc-2"]},
        {"cited": ["doc-9"], "retrieved": ["doc-1", "doc-2"]},
        {"cited": '["doc-2"]', "retrieved": [{"id": "doc-2", "text": "..."}, {"id": "doc-3"}]},
        {"cited": ["doc-1"], "retrieved": []},
        {"cited": [], "retrieved": ["doc-1"]},
    ]
    result = failing(grounded("cited", "retrieved"), rows)
    assert sorted(result) == [1, 3, 4]
    assert "cites none of the retrieved documents (doc-1, doc-2)" in result[1][0]
    assert "no documents were retrieved" in result[3][0]


def test_grounded_finds_cited_ids_in_answer_text_as_whole_words():
    rows = [
        {"answer": "Refunds take 5 days [doc-12].", "retrieved": ["doc-12", "doc-3"]},
        {"answer": "Refunds take 5 days [doc-123].", "retrieved": ["doc-12"]},
        {"answer": "Refunds take 5 days.", "retrieved": ["doc-12"]},
    ]
    assert sorted(failing(grounded("answer", "retrieved"), rows)) == [1, 2]


def test_grounded_can_reject_invented_citations():
    rows = [
        {"cited": ["doc-1", "doc-7"], "retrieved": ["doc-1"]},
        {"cited": ["doc-1"], "retrieved": ["doc-1"]},
    ]
    assert failing(grounded("cited", "retrieved"), rows) == {}
    strict = failing(grounded("cited", "retrieved", require_known_citations=True), rows)
    assert list(strict) == [0]
    assert "not retrieved: doc-7" in strict[0][0]


def test_not_refusal_catches_i_dont_know_answers():
    rows = column(
        "answer",
        "I don't know.",
        "I do not know the answer to that.",
        "As an AI, I cannot help with that.",
        "Unknown",
        "I know the answer: the refund takes 5 days.",
        "The sender is unknown to our carrier, so we reopened the ticket.",
        "I\u2019m not sure.",
    )
    result = failing(not_refusal("answer"), rows)
    assert sorted(result) == [0, 1, 2, 3, 6]


def test_refusal_rate_is_a_batch_check_with_the_observed_rate():
    answers = ["I don't know", "Refund issued", "Shipped today", "Password reset sent", "Card replaced"]
    ok = run_suite(
        ValidationSuite(name="s", checks=[refusal_rate_at_most("answer", 0.2)]), column("answer", *answers)
    )
    assert ok.success
    assert ok.checks[0].observed_rate == pytest.approx(0.2)
    assert ok.row_reasons == {}  # a batch check blames no single row
    assert [e.row for e in ok.checks[0].examples] == [0]

    answers[1] = "no idea"
    custom = refusal_rate_at_most("answer", 0.2, patterns=[r"(?i)^no idea$"])
    too_many = run_suite(suite_of(custom), column("answer", *answers))
    assert not too_many.success
    assert too_many.checks[0].observed_rate == pytest.approx(0.4)


def test_a_column_no_row_has_is_missing_everywhere():
    result = failing(label_in_set("label", ["a"]), column("other", "a", "b"))
    assert result == {0: ["in_set:label: missing"], 1: ["in_set:label: missing"]}


def test_examples_are_redacted_and_shortened():
    long_answer = "Contact jane.doe@example.com " + "x" * 300
    run = run_suite(suite_of(no_pii("answer")), column("answer", long_answer))
    example = run.checks[0].examples[0]
    assert "jane.doe@example.com" not in example.value
    assert "[REDACTED:EMAIL]" in example.value
    assert len(example.value) <= 120


def test_one_gx_context_per_process_and_no_growth_across_runs():
    suite = ValidationSuite(name="reuse", checks=[not_empty("a")])
    run_suite(suite, column("a", "x"))
    runtime = gx_runtime()
    cached = len(runtime._definitions)
    for _ in range(3):
        run_suite(suite, column("a", "x", ""))
    assert gx_runtime() is runtime
    assert len(runtime._definitions) == cached
    assert runtime._context.validation_results_store.list_keys() == []


def test_examples_stay_on_one_line():
    run = run_suite(suite_of(label_in_set("label", ["a"])), column("label", "line one\nline two"))
    assert run.checks[0].examples[0].value == "line one\\nline two"
