"""Gate outcomes over real Great Expectations results: pass, fail, quarantine, threshold."""

from __future__ import annotations

import json

import pytest

from governed_ai.core.validation import (
    ValidationSuite,
    apply_outcome,
    check_outcome,
    label_in_set,
    length_between,
    no_pii,
    refusal_rate_at_most,
    run_suite,
)

SUITE = ValidationSuite(
    name="ticket_labels",
    checks=[
        label_in_set("sentiment", ["negative", "positive"]),
        length_between("summary", min_length=3, max_length=40),
        no_pii("summary"),
    ],
)

GOOD = [
    {"id": "T-1", "sentiment": "negative", "summary": "double charge"},
    {"id": "T-2", "sentiment": "positive", "summary": "thanks for the fix"},
    {"id": "T-3", "sentiment": "negative", "summary": "login fails"},
]
BAD = [
    {"id": "T-4", "sentiment": "neutral", "summary": "asks about plans"},
    {"id": "T-5", "sentiment": "negative", "summary": "mail jane.doe@example.com"},
]


def gate(rows, **options):
    return apply_outcome(run_suite(SUITE, rows), rows, **options)


def test_a_clean_batch_passes_every_outcome():
    for outcome, threshold in (("fail", None), ("quarantine", None), ("threshold", 1.0)):
        result = gate(GOOD, outcome=outcome, threshold=threshold)
        assert result.report.status == "passed"
        assert result.passed_rows == GOOD
        assert result.quarantined_rows == []
        assert result.report.pass_rate == 1.0
        assert all(check.success for check in result.report.checks)


def test_fail_outcome_reports_which_check_how_many_rows_and_examples():
    result = gate(GOOD + BAD, outcome="fail")
    report = result.report
    assert report.failed and result.passed_rows == []
    assert report.failed_checks == ["in_set:sentiment", "no_pii:summary"]
    assert report.failures == [
        "in_set:sentiment: 1 of 5 rows failed; required: every row",
        "no_pii:summary: 1 of 5 rows failed; required: every row",
    ]
    text = report.to_text()
    assert "FAILED in_set:sentiment: 1 of 5 rows failed" in text
    assert "row 3: in_set:sentiment: 'neutral' is not one of 'negative', 'positive'" in text
    # The example shows that PII was found, not the PII itself.
    assert "jane.doe@example.com" not in text and "[REDACTED:EMAIL]" in text
    json.dumps(report.model_dump(mode="json"))  # XCom-safe


def test_fail_outcome_lets_rows_through_that_mostly_tolerates():
    tolerant = ValidationSuite(
        name="tolerant", checks=[label_in_set("sentiment", ["negative", "positive"], mostly=0.75)]
    )
    rows = [*GOOD, BAD[0]]
    result = apply_outcome(run_suite(tolerant, rows), rows, outcome="fail")
    assert result.report.status == "passed"
    assert result.passed_rows == rows
    assert result.report.rows_passing_all_checks == 3
    assert result.report.checks[0].failed_rows == 1


def test_quarantine_splits_rows_and_loses_none():
    rows = [GOOD[0], BAD[0], GOOD[1], BAD[1], GOOD[2]]
    result = gate(rows, outcome="quarantine")
    assert result.report.status == "quarantined"
    assert result.passed_rows == GOOD
    assert [q["index"] for q in result.quarantined_rows] == [1, 3]
    assert [q["row"] for q in result.quarantined_rows] == BAD
    assert result.quarantined_rows[0]["reasons"] == [
        "in_set:sentiment: 'neutral' is not one of 'negative', 'positive'"
    ]
    assert result.quarantined_rows[1]["reasons"] == ["no_pii:summary: contains EMAIL"]
    ids = [r["id"] for r in result.passed_rows] + [q["row"]["id"] for q in result.quarantined_rows]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    report = result.report
    assert (report.rows, report.passed_rows, report.quarantined_rows) == (5, 3, 2)
    assert report.pass_rate == pytest.approx(0.6)


def test_a_failing_batch_check_fails_the_quarantine_outcome():
    suite = ValidationSuite(name="refusals", checks=[refusal_rate_at_most("answer", 0.25)])
    rows = [{"answer": "I don't know"}, {"answer": "I do not know"}, {"answer": "Refund sent"}]
    result = apply_outcome(run_suite(suite, rows), rows, outcome="quarantine")
    assert result.report.status == "failed"
    assert result.report.failures == [
        "refusal_rate:answer: 2 of 3 rows failed; observed rate 66.7%; required: refusal rate <= 25%"
    ]


def test_threshold_outcome_fails_only_below_the_pass_rate():
    rows = [*GOOD, BAD[0]]  # 3 of 4 pass
    at = gate(rows, outcome="threshold", threshold=0.75)
    assert at.report.status == "quarantined"
    assert len(at.passed_rows) == 3 and len(at.quarantined_rows) == 1

    above = gate(rows, outcome="threshold", threshold=0.8)
    assert above.report.status == "failed"
    assert above.report.failures == ["pass rate 75.0% (3 of 4 rows) is below the threshold 80.0%"]
    # The rows are still split, so the failing ones can be inspected.
    assert len(above.quarantined_rows) == 1


def test_an_empty_batch_fails_unless_allowed():
    assert gate([], outcome="quarantine").report.failures == [
        "no rows to validate (set allow_empty=True if an empty batch is normal)"
    ]
    allowed = gate([], outcome="threshold", threshold=0.9, allow_empty=True)
    assert allowed.report.status == "passed" and allowed.report.pass_rate is None


@pytest.mark.parametrize(
    ("outcome", "threshold", "message"),
    [
        ("drop", None, "'outcome' must be one of fail, quarantine, threshold"),
        ("threshold", None, "outcome 'threshold' needs 'threshold'"),
        ("threshold", 0.0, r"'threshold' must be in \(0, 1\]"),
        ("threshold", 1.5, r"'threshold' must be in \(0, 1\]"),
        ("quarantine", 0.9, "only used with outcome 'threshold'"),
    ],
)
def test_outcome_settings_are_checked(outcome, threshold, message):
    with pytest.raises(ValueError, match=message):
        check_outcome(outcome, threshold)


def test_rows_must_be_the_ones_the_suite_ran_over():
    with pytest.raises(ValueError, match="ran over 3 rows but 2 rows"):
        apply_outcome(run_suite(SUITE, GOOD), GOOD[:2])
