"""The real local model's outputs through a real Great Expectations suite (few calls, small max_tokens)."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from governed_ai.core.chat import ChatRequest
from governed_ai.core.redaction import Redactor
from governed_ai.core.validation import (
    ValidationSuite,
    apply_outcome,
    conforms_to_schema,
    label_in_set,
    length_between,
    no_pii,
    not_empty,
    run_suite,
)

REVIEWS = [
    ("R-1", "I love this product, it works perfectly and arrived early!"),
    ("R-2", "Terrible. It broke after one day and support never answered."),
]


POLICY = """
version: 1
rules:
  - name: real-model
    match: {dag_id: "*"}
    models: [{connection: governed_ai_llm_default, model: smollm2}]
"""


class Review(BaseModel):
    sentiment: Literal["negative", "positive"]
    reason: str = Field(max_length=80)


@pytest.mark.real_model
def test_local_model_outputs_are_validated_by_the_gate(local_model_connection, client_for_connection):
    client = client_for_connection(POLICY)
    rows = []
    for review_id, text in REVIEWS:
        request = ChatRequest(
            messages=[
                {"role": "system", "content": "Is this review positive or negative? Give a short reason."},
                {"role": "user", "content": text},
            ],
            model="",
            output_schema=Review,
            temperature=0.0,
            max_tokens=64,
        )
        result = client.chat(request).result
        rows.append({"review_id": review_id, "raw": result.content, **(result.output or {})})

    suite = ValidationSuite(
        name="review_sentiment",
        checks=[
            conforms_to_schema("raw", model=Review),
            label_in_set("sentiment", ["negative", "positive"]),
            not_empty("reason"),
            length_between("reason", max_length=80),
            no_pii("reason"),
        ],
    )
    gate = apply_outcome(run_suite(suite, rows), rows, outcome="quarantine")
    assert gate.report.rows == len(REVIEWS)
    # Grammar-constrained JSON always fits the schema (FIELD-NOTES); whether the sentiment is right is
    # not the gate's business and not asserted: this 135M model gets some of these wrong.
    assert gate.report.checks[0].success, gate.report.to_text()
    assert gate.report.checks[1].success, gate.report.to_text()
    # Every row passes or is quarantined, and exactly as an independent check of the same rules says.
    redactor = Redactor()
    for index, row in enumerate(rows):
        reason = row.get("reason")
        clean = (
            isinstance(reason, str)
            and reason.strip() != ""
            and len(reason) <= 80
            and not redactor.redact(reason).changed
        )
        assert (row in gate.passed_rows) == clean, (index, row, gate.report.to_text())
        assert any(q["index"] == index for q in gate.quarantined_rows) == (not clean)
