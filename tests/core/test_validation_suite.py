"""Suites defined in code or loaded from JSON files, with errors that name the file and the field."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel

from governed_ai.core.redaction import RedactionSettings
from governed_ai.core.validation import (
    JsonSchemaCheck,
    SuiteSpecError,
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


class Verdict(BaseModel):
    label: Literal["ok", "bad"]


def every_kind() -> ValidationSuite:
    return ValidationSuite(
        name="every_kind",
        description="one check of each kind",
        checks=[
            not_empty("answer"),
            length_between("answer", max_length=200, mostly=0.9),
            label_in_set("label", ["ok", "bad"]),
            matches_regex("id", r"^T-\d+$"),
            not_refusal("answer", patterns=[r"(?i)no idea"]),
            conforms_to_schema("output", model=Verdict),
            conforms_to_schema("output", json_schema={"type": "object"}, name="output_is_object"),
            no_pii("answer", redaction=RedactionSettings(phone_numbers=False)),
            grounded("cited", "retrieved", require_known_citations=True),
            refusal_rate_at_most("answer", 0.1),
        ],
    )


def test_json_round_trip_keeps_every_check(tmp_path):
    suite = every_kind()
    path = tmp_path / "suite.json"
    path.write_text(suite.to_json())
    loaded = ValidationSuite.from_json_file(path)
    assert loaded == suite
    # The pydantic model travels as its import path and comes back as the class itself.
    spec = json.loads(path.read_text())
    assert spec["checks"][5]["model"] == f"{__name__}.Verdict"
    assert loaded.check("json_schema:output").model is Verdict


def test_suite_file_is_usable_without_python(tmp_path):
    path = tmp_path / "classification.json"
    path.write_text(
        json.dumps(
            {
                "name": "classification",
                "checks": [
                    {"kind": "in_set", "column": "label", "values": ["ok", "bad"]},
                    {
                        "kind": "json_schema",
                        "column": "output",
                        "model": f"{__name__}.Verdict",
                        "mostly": 0.5,
                    },
                ],
            }
        )
    )
    suite = ValidationSuite.from_json_file(path)
    run = run_suite(suite, [{"label": "ok", "output": {"label": "ok"}}, {"label": "meh", "output": {}}])
    assert dict(run.row_reasons).keys() == {1}
    assert suite.columns == ("label", "output")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"name": "s", "checks": [{"kind": "in_set", "column": "a"}]}', "checks[0].values: Field required"),
        ('{"name": "s", "checks": [{"kind": "nope", "column": "a"}]}', "checks[0]: Input tag 'nope'"),
        ('{"name": "s", "checks": [{"kind": "length", "column": "a"}]}', "give min_length, max_length"),
        ('{"name": "s", "checks": [{"kind": "regex", "column": "a", "pattern": "("}]}', "checks[0].pattern"),
        (
            '{"name": "s", "checks": [{"kind": "json_schema", "column": "a", "model": "no.such.Model"}]}',
            "checks[0].model",
        ),
        (
            '{"name": "s", "checks": [{"kind": "json_schema", "column": "a", "json_schema": {"type": 5}}]}',
            "not a valid JSON Schema",
        ),
        ('{"name": "s", "checks": [{"kind": "not_empty", "column": "a", "colum": "b"}]}', "checks[0].colum"),
        ('{"name": "s", "checks": []}', "checks: "),
        ('{"name": "has space", "checks": [{"kind": "not_empty", "column": "a"}]}', "name: "),
        (
            '{"name": "s", "checks": [{"kind": "in_set", "column": "a", "values": [1], "mostly": 2}]}',
            "checks[0].mostly",
        ),
        ('{"name": "s", "checks": [', "is not valid JSON: line 1"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SuiteSpecError) as error:
        ValidationSuite.from_json_file(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_duplicate_check_names_are_rejected_with_a_hint():
    with pytest.raises(SuiteSpecError, match=r"used more than once: \['in_set:a'\].*distinct 'name'"):
        ValidationSuite.from_dict(
            {
                "name": "s",
                "checks": [
                    {"kind": "in_set", "column": "a", "values": [1]},
                    {"kind": "in_set", "column": "a", "values": [2]},
                ],
            }
        )


def test_missing_suite_file_is_reported(tmp_path):
    with pytest.raises(SuiteSpecError, match="does not exist"):
        ValidationSuite.from_json_file(tmp_path / "absent.json")


def test_schema_check_needs_exactly_one_schema():
    with pytest.raises(ValueError, match="exactly one of json_schema"):
        JsonSchemaCheck(column="a")
    with pytest.raises(ValueError, match="exactly one of json_schema"):
        JsonSchemaCheck(column="a", model=Verdict, json_schema={"type": "object"})
    with pytest.raises(ValueError, match="pydantic model class"):
        JsonSchemaCheck(column="a", model="json.dumps")
