"""Getting batches of outputs into rows: lists, rendered text, files, LLMOperator results, manifests."""

from __future__ import annotations

import json

import pytest

from governed_ai.core.validation import (
    RowsError,
    load_rows,
    merge_inputs,
    read_rows_file,
    rows_from_llm_results,
    rows_from_value,
    write_jsonl,
)
from governed_ai.core.validation.rows import manifest

ROWS = [{"id": 1, "label": "bug", "ok": True, "note": None}, {"id": 2, "label": "billing", "ok": False}]


def test_rows_from_lists_json_text_and_python_literals():
    assert rows_from_value(ROWS) == ROWS
    assert rows_from_value(tuple(ROWS)) == ROWS
    assert rows_from_value(json.dumps(ROWS)) == ROWS
    # What Jinja renders for a list when render_template_as_native_obj is off.
    assert rows_from_value(str(ROWS)) == ROWS


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not a list at all", "neither JSON nor a Python literal list"),
        ({"id": 1}, "single dict"),
        (42, "must be a list of dicts, got int"),
        ([{"id": 1}, "two"], r"rows\[1\] is a str, not a dict"),
    ],
)
def test_bad_rows_say_what_was_expected(value, message):
    with pytest.raises(RowsError, match=message):
        rows_from_value(value)


def test_jsonl_and_json_files(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    assert write_jsonl(jsonl, ROWS) == 2
    assert read_rows_file(jsonl) == ROWS
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(ROWS))
    assert read_rows_file(as_json) == ROWS


def test_file_errors_name_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1}\n\n{"id": \n')
    with pytest.raises(RowsError, match=r"broken.jsonl, line 3: not valid JSON"):
        read_rows_file(broken)
    with pytest.raises(RowsError, match="does not exist"):
        read_rows_file(tmp_path / "absent.jsonl")


def test_a_manifest_reads_back_as_its_rows(tmp_path):
    path = tmp_path / "passed.jsonl"
    write_jsonl(path, ROWS)
    assert load_rows(manifest(path, 2)) == ROWS
    assert load_rows(ROWS) == ROWS


def test_llm_results_become_rows_of_their_output_fields():
    results = [
        {"content": '{"label": "bug"}', "output": {"label": "bug", "urgency": 2}, "model": "m", "usage": {}},
        {"content": "plain text reply", "output": None, "model": "m", "usage": {}},
    ]
    assert rows_from_llm_results(results) == [
        {"content": '{"label": "bug"}', "label": "bug", "urgency": 2},
        {"content": "plain text reply"},
    ]
    with pytest.raises(RowsError, match=r"rows\[0\] is not an LLMOperator result"):
        rows_from_llm_results([{"label": "bug"}])


def test_inputs_are_merged_one_to_one_and_outputs_win():
    rows = [{"label": "bug", "text": "from the model"}, {"label": "billing"}]
    inputs = [{"ticket_id": "T-1", "text": "original"}, "T-2 as a plain prompt"]
    assert merge_inputs(rows, inputs) == [
        {"ticket_id": "T-1", "text": "from the model", "label": "bug"},
        {"input": "T-2 as a plain prompt", "label": "billing"},
    ]
    with pytest.raises(RowsError, match="has 1 entries but there are 2 rows"):
        merge_inputs(rows, inputs[:1])
