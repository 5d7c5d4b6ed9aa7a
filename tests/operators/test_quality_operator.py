"""LLMOutputQualityOperator: parse-time checks, execute on real Great Expectations, audit, files, lineage."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from airflow.exceptions import AirflowFailException
from pydantic import BaseModel

from governed_ai.core.validation import (
    ValidationSuite,
    label_in_set,
    length_between,
    load_rows,
    no_pii,
    refusal_rate_at_most,
    write_jsonl,
)
from governed_ai.core.xcom import is_rows_manifest
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.llm import LLMOperator
from governed_ai.operators.quality import LLMOutputQualityOperator
from tests.conftest import FakeTaskInstance, fake_context
from tests.fakes.openai_server import FakeOpenAIServer

POLICY = """
version: 1
rules:
  - name: unit-tests
    match: {dag_id: unit_dag}
    models:
      - {connection: test_llm, model: "fake-*"}
    redaction:
      custom_patterns: [{name: ticket_secret, regex: "TKT-[0-9a-f]{16}"}]
"""

SUITE = ValidationSuite(
    name="ticket_labels",
    checks=[
        label_in_set("sentiment", ["negative", "positive"]),
        length_between("summary", min_length=3, max_length=60),
        no_pii("summary"),
    ],
)
GOOD = [
    {"ticket_id": "T-1", "sentiment": "negative", "summary": "charged twice"},
    {"ticket_id": "T-2", "sentiment": "positive", "summary": "thanks for the quick fix"},
]
BAD = [
    {"ticket_id": "T-3", "sentiment": "neutral", "summary": "asks about plans"},
    {"ticket_id": "T-4", "sentiment": "negative", "summary": "write to jane.doe@example.com"},
]


@dataclass(frozen=True)
class RecordingTaskInstance(FakeTaskInstance):
    """A named fake task instance that keeps what the operator pushes to XCom under explicit keys."""

    pushed: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def context_with_xcom() -> dict[str, Any]:
    context = fake_context()
    context["ti"] = RecordingTaskInstance()
    return context


@pytest.fixture
def policy(governance_policy) -> None:
    governance_policy(POLICY)


def audit_records(action: str = "validation.run"):
    return GovernanceHook().governor.audit.query(dag_id="unit_dag", action=action, order="asc")


# -- parse time -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of 'rows'"),
        ({"rows": [], "rows_path": "x.jsonl"}, "exactly one of 'rows'"),
        ({"rows": [], "outcome": "drop"}, "t: 'outcome' must be one of"),
        ({"rows": [], "outcome": "threshold"}, "needs 'threshold'"),
        ({"rows": [], "input_format": "csv"}, "'input_format' must be one of rows, llm_results"),
        ({"rows": [], "max_xcom_rows": -1}, "'max_xcom_rows' must be >= 0"),
        ({"rows": [], "outcome": "quarantine", "quarantine_xcom_key": None}, "would be lost"),
    ],
)
def test_parameters_are_checked_at_parse_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLMOutputQualityOperator(task_id="t", suite=SUITE, **kwargs)


def test_suite_must_be_a_suite_or_a_path():
    with pytest.raises(TypeError, match="'suite' must be a ValidationSuite or the path"):
        LLMOutputQualityOperator(task_id="t", suite={"name": "x"}, rows=[])  # type: ignore[arg-type]


def test_a_broken_suite_file_is_reported_at_parse_time(tmp_path):
    path = tmp_path / "suite.json"
    path.write_text('{"name": "s", "checks": [{"kind": "in_set", "column": "a"}]}')
    with pytest.raises(ValueError, match=r"(?s)t: 'suite': suite file .*checks\[0\].values: Field required"):
        LLMOutputQualityOperator(task_id="t", suite=str(path), rows=[])


def test_template_fields_cover_inputs_and_paths():
    assert set(LLMOutputQualityOperator.template_fields) == {
        "suite",
        "rows",
        "rows_path",
        "inputs",
        "quarantine_path",
        "passed_path",
    }


# -- execute ----------------------------------------------------------------------------------------------


def test_passing_batch_returns_report_and_rows_and_is_audited(policy):
    op = LLMOutputQualityOperator(task_id="gate", suite=SUITE, rows=GOOD)
    result = op.execute(context=fake_context())  # type: ignore[arg-type]
    assert result["passed"] == GOOD
    assert result["report"]["status"] == "passed"
    assert result["report"]["rows"] == 2
    json.dumps(result)  # XCom-safe
    [record] = audit_records()
    assert (record.resource, record.decision, record.outcome) == ("ticket_labels", "n/a", "ok")
    assert record.extra["rows"] == 2 and record.extra["passed_rows"] == 2
    assert record.extra["failed_checks"] == []


def test_fail_outcome_raises_with_the_report_and_audits_the_failure(policy):
    op = LLMOutputQualityOperator(task_id="gate", suite=SUITE, rows=GOOD + BAD)
    with pytest.raises(AirflowFailException) as failure:
        op.execute(context=fake_context())  # type: ignore[arg-type]
    message = str(failure.value)
    assert "FAILED in_set:sentiment: 1 of 4 rows failed" in message
    assert "row 2: in_set:sentiment: 'neutral' is not one of" in message
    assert "jane.doe@example.com" not in message
    [record] = audit_records()
    assert record.outcome == "failed"
    assert record.extra["failed_checks"] == ["in_set:sentiment", "no_pii:summary"]
    assert "in_set:sentiment: 1 of 4 rows failed" in (record.error or "")


def test_quarantine_writes_file_and_xcom_with_reasons_redacted(policy, tmp_path):
    rows = [GOOD[0], BAD[0], {**BAD[1], "note": "TKT-0123456789abcdef"}, GOOD[1]]
    path = tmp_path / "quarantine.jsonl"
    op = LLMOutputQualityOperator(
        task_id="gate", suite=SUITE, rows=rows, outcome="quarantine", quarantine_path=str(path)
    )
    context = context_with_xcom()
    result = op.execute(context=context)  # type: ignore[arg-type]

    assert result["passed"] == GOOD
    assert result["report"]["status"] == "quarantined"
    in_file = [json.loads(line) for line in path.read_text().splitlines()]
    assert in_file == context["ti"].pushed["quarantined"]
    assert [q["index"] for q in in_file] == [1, 2]
    assert in_file[0]["reasons"] == ["in_set:sentiment: 'neutral' is not one of 'negative', 'positive'"]
    assert in_file[1]["reasons"] == ["no_pii:summary: contains EMAIL"]
    # Set aside for review, not for leaking: redacted, including the policy's own pattern.
    assert in_file[1]["row"]["summary"] == "write to [REDACTED:EMAIL]"
    assert in_file[1]["row"]["note"] == "[REDACTED:TICKET_SECRET]"
    assert in_file[1]["row"]["ticket_id"] == "T-4"
    [record] = audit_records()
    assert record.outcome == "quarantined" and record.extra["quarantined_rows"] == 2


def test_threshold_below_fails_but_keeps_the_quarantined_rows(policy, tmp_path):
    path = tmp_path / "quarantine.jsonl"
    op = LLMOutputQualityOperator(
        task_id="gate",
        suite=SUITE,
        rows=GOOD + BAD,
        outcome="threshold",
        threshold=0.9,
        quarantine_path=str(path),
    )
    with pytest.raises(
        AirflowFailException, match=r"pass rate 50.0% \(2 of 4 rows\) is below the threshold 90.0%"
    ):
        op.execute(context=context_with_xcom())  # type: ignore[arg-type]
    assert len(path.read_text().splitlines()) == 2
    assert audit_records()[0].outcome == "failed"


def test_a_failing_batch_check_fails_the_task(policy):
    suite = ValidationSuite(name="refusals", checks=[refusal_rate_at_most("summary", 0.0)])
    rows = [{"summary": "I don't know"}, {"summary": "charged twice"}]
    op = LLMOutputQualityOperator(task_id="gate", suite=suite, rows=rows, outcome="quarantine")
    with pytest.raises(AirflowFailException, match="refusal_rate:summary: 1 of 2 rows failed"):
        op.execute(context=context_with_xcom())  # type: ignore[arg-type]


def test_empty_input_fails_unless_allowed(policy):
    with pytest.raises(AirflowFailException, match="no rows to validate"):
        LLMOutputQualityOperator(task_id="gate", suite=SUITE, rows=[]).execute(context=fake_context())  # type: ignore[arg-type]
    allowed = LLMOutputQualityOperator(task_id="gate", suite=SUITE, rows=[], allow_empty=True)
    assert allowed.execute(context=fake_context())["passed"] == []  # type: ignore[arg-type]


def test_rows_and_suite_from_files(policy, tmp_path):
    rows_path = tmp_path / "outputs.jsonl"
    write_jsonl(rows_path, GOOD + BAD[:1])
    suite_path = tmp_path / "suite.json"
    suite_path.write_text(SUITE.to_json())
    op = LLMOutputQualityOperator(
        task_id="gate", suite=str(suite_path), rows_path=str(rows_path), outcome="quarantine"
    )
    context = context_with_xcom()
    result = op.execute(context=context)  # type: ignore[arg-type]
    assert result["report"]["suite"] == "ticket_labels"
    assert result["passed"] == GOOD
    assert [q["row"] for q in context["ti"].pushed["quarantined"]] == BAD[:1]


def test_bad_rows_fail_without_retry_and_name_the_parameter(policy):
    op = LLMOutputQualityOperator(task_id="gate", suite=SUITE, rows="[{'a': 1}, 'x']")
    with pytest.raises(AirflowFailException, match=r"gate: rows\[1\] is a str, not a dict"):
        op.execute(context=fake_context())  # type: ignore[arg-type]


def test_large_batches_travel_as_file_manifests(policy):
    rows = [{"sentiment": "positive", "summary": f"all good {i}"} for i in range(5)] + [BAD[0]] * 3
    op = LLMOutputQualityOperator(
        task_id="gate", suite=SUITE, rows=rows, outcome="quarantine", max_xcom_rows=2
    )
    context = context_with_xcom()
    result = op.execute(context=context)  # type: ignore[arg-type]
    assert is_rows_manifest(result["passed"]) and result["passed"]["rows"] == 5
    assert load_rows(result["passed"]) == rows[:5]
    pushed = context["ti"].pushed["quarantined"]
    assert pushed["rows"] == 3
    assert [q["index"] for q in load_rows(pushed)] == [5, 6, 7]


# -- LLMOperator results in, through a fake model server --------------------------------------------------


class Ticket(BaseModel):
    sentiment: Literal["negative", "positive", "neutral"]
    summary: str


@pytest.fixture
def fake_llm(monkeypatch: pytest.MonkeyPatch, policy) -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(models=("fake-model",)) as server:
        monkeypatch.setenv("AIRFLOW_CONN_TEST_LLM", server.connection_json(default_model="fake-model"))
        yield server


def test_llm_operator_results_are_validated_with_their_inputs(fake_llm):
    tickets = [{"ticket_id": "T-1", "text": "charged twice"}, {"ticket_id": "T-2", "text": "meh"}]
    fake_llm.script(
        '{"sentiment": "negative", "summary": "double charge"}',
        '{"sentiment": "neutral", "summary": "unclear"}',
    )
    results = [
        LLMOperator(
            task_id="classify", prompt=t["text"], output_schema=Ticket, llm_conn_id="test_llm"
        ).execute(
            context=fake_context(task_id="classify")  # type: ignore[arg-type]
        )
        for t in tickets
    ]
    op = LLMOutputQualityOperator(
        task_id="gate",
        suite=SUITE,
        rows=results,
        input_format="llm_results",
        inputs=tickets,
        outcome="quarantine",
    )
    context = context_with_xcom()
    result = op.execute(context=context)  # type: ignore[arg-type]
    [passed] = result["passed"]
    assert passed["ticket_id"] == "T-1" and passed["sentiment"] == "negative"
    assert passed["content"] == '{"sentiment": "negative", "summary": "double charge"}'
    [quarantined] = context["ti"].pushed["quarantined"]
    assert quarantined["row"]["ticket_id"] == "T-2"
    assert quarantined["reasons"] == ["in_set:sentiment: 'neutral' is not one of 'negative', 'positive'"]


# -- OpenLineage ------------------------------------------------------------------------------------------


def test_lineage_carries_data_quality_assertions(policy, tmp_path):
    from openlineage.client.serde import Serde

    path = tmp_path / "quarantine.jsonl"
    op = LLMOutputQualityOperator(
        task_id="gate", suite=SUITE, rows=GOOD + BAD, outcome="quarantine", quarantine_path=str(path)
    )
    assert op.get_openlineage_facets_on_complete(None).inputs == []  # nothing validated yet
    op.execute(context=context_with_xcom())  # type: ignore[arg-type]

    lineage = op.get_openlineage_facets_on_complete(None)
    [validated] = lineage.inputs
    assert (validated.namespace, validated.name) == ("governed_ai", "unit_dag.unit_task.rows")
    facet = validated.inputFacets["dataQualityAssertions"]
    assert [(a.name, a.assertion, a.column, a.success) for a in facet.assertions] == [
        ("in_set:sentiment", "in_set", "sentiment", False),
        ("length:summary", "length", "summary", True),
        ("no_pii:summary", "no_pii", "summary", False),
    ]
    assert facet.assertions[0].actual == "1 of 4 rows failed"
    assert validated.inputFacets["dataQualityMetrics"].rowCount == 4
    assert [(o.namespace, o.name) for o in lineage.outputs] == [("file", str(path.resolve()))]
    event_json = Serde.to_dict(validated)
    assert event_json["inputFacets"]["dataQualityAssertions"]["_schemaURL"].endswith(
        "DataQualityAssertionsDatasetFacet"
    )


def test_lineage_on_failure_reports_the_failed_assertions(policy):
    op = LLMOutputQualityOperator(task_id="gate", suite=SUITE, rows=BAD)
    with pytest.raises(AirflowFailException):
        op.execute(context=fake_context())  # type: ignore[arg-type]
    facet = op.get_openlineage_facets_on_failure(None).inputs[0].inputFacets["dataQualityAssertions"]
    assert {a.name: a.success for a in facet.assertions}["in_set:sentiment"] is False
    assert {a.severity for a in facet.assertions} == {"error"}


@pytest.mark.parametrize(
    "blocked", ["airflow.providers.openlineage.extractors", "openlineage.client.event_v2"]
)
def test_lineage_degrades_silently_without_openlineage(policy, monkeypatch, blocked):
    op = LLMOutputQualityOperator(task_id="gate", suite=SUITE, rows=GOOD)
    op.execute(context=fake_context())  # type: ignore[arg-type]
    # A None entry in sys.modules makes the import raise ImportError, as if the package were absent.
    monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.delitem(sys.modules, "governed_ai.core.validation.lineage", raising=False)
    assert op.get_openlineage_facets_on_complete(None) is None
    assert op.get_openlineage_facets_on_failure(None) is None
