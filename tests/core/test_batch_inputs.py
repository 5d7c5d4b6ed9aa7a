"""Batch items: keys from a named field or from the content, duplicates refused, JSONL/JSON/CSV parsing."""

from __future__ import annotations

import csv
import io
import json

import pytest

from governed_ai.core.batch import BatchInputError, make_items, parse_rows
from governed_ai.core.batch.inputs import content_key


def test_keys_come_from_the_key_field_as_text_and_positions_follow_the_input():
    rows = [{"id": 7, "text": "a"}, {"id": "x-2", "text": "b"}]
    items = make_items(rows, key_field="id")
    assert [(i.key, i.position, i.data) for i in items] == [("7", 0, rows[0]), ("x-2", 1, rows[1])]


def test_content_keys_do_not_depend_on_position_or_dict_order():
    a = make_items([{"text": "hello", "lang": "en"}, "plain string"])
    b = make_items(["plain string", {"lang": "en", "text": "hello"}])
    assert {i.key for i in a} == {i.key for i in b}
    assert a[0].key == b[1].key and a[0].position == 0 and b[1].position == 1
    assert a[0].key != a[1].key
    assert len(a[0].key) == 24 and int(a[0].key, 16) >= 0  # a hex digest prefix


def test_content_key_changes_with_the_content():
    assert content_key({"text": "hello"}) != content_key({"text": "hello!"})


@pytest.mark.parametrize("row", [{"text": "no id"}, {"id": None}, {"id": ""}, "not a mapping"])
def test_an_item_without_its_key_field_is_an_error_naming_the_item(row):
    with pytest.raises(BatchInputError, match=r"item 1 has no 'id' field \(key_field\)"):
        make_items([{"id": "ok"}, row], key_field="id")


def test_input_errors_name_positions_and_fields_never_the_data():
    # The message ends up in the task log, which is not redacted: it must not quote the item or its key.
    with pytest.raises(BatchInputError, match=r"its fields: \['email', 'text'\]") as missing:
        make_items([{"email": "jane.roe@example.com", "text": "card 4111 1111 1111 1111"}], key_field="id")
    assert "jane.roe" not in str(missing.value) and "4111" not in str(missing.value)
    with pytest.raises(BatchInputError) as duplicate:
        make_items([{"id": "jane.roe@example.com"}, {"id": "jane.roe@example.com"}], key_field="id")
    assert "jane.roe" not in str(duplicate.value)


def test_duplicate_key_field_values_are_refused_with_both_positions():
    with pytest.raises(BatchInputError, match=r"items 0 and 2 have the same 'id' value.*key_field"):
        make_items([{"id": "a"}, {"id": "b"}, {"id": "a"}], key_field="id")


def test_duplicate_content_is_refused_when_keys_are_content_hashes():
    with pytest.raises(BatchInputError, match=r"items 0 and 1 have the same content.*remove the duplicate"):
        make_items([{"t": 1}, {"t": 1}])


def test_content_that_is_not_json_is_refused():
    with pytest.raises(BatchInputError, match="item 0 is not JSON-serialisable"):
        make_items([{"when": object()}])


def test_jsonl_rows_skip_blank_lines_and_report_bad_lines_by_number():
    rows = [{"id": i, "text": f"t{i}"} for i in range(3)]
    text = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n"
    assert parse_rows(text, "in.jsonl") == rows
    assert parse_rows(text, "in.NDJSON") == rows
    with pytest.raises(BatchInputError, match="in.jsonl line 2 is not valid JSON"):
        parse_rows('{"id": 1}\n{"id": \n', "in.jsonl")


def test_csv_rows_are_dicts_by_header():
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "text"])
    writer.writeheader()
    writer.writerows([{"id": "1", "text": "comma, inside"}, {"id": "2", "text": 'quote " inside'}])
    assert parse_rows(buffer.getvalue(), "tickets.csv") == [
        {"id": "1", "text": "comma, inside"},
        {"id": "2", "text": 'quote " inside'},
    ]
    with pytest.raises(BatchInputError, match="no header row"):
        parse_rows("", "empty.csv")


def test_json_files_must_hold_a_list():
    assert parse_rows('[{"id": 1}, "two"]', "in.json") == [{"id": 1}, "two"]
    with pytest.raises(BatchInputError, match="in.json must hold a JSON list of items, got dict"):
        parse_rows('{"id": 1}', "in.json")
    with pytest.raises(BatchInputError, match=r"in.json is not valid JSON \(line 2, column 1\)"):
        parse_rows('[{"id": 1},\n', "in.json")


def test_other_suffixes_are_refused_with_the_supported_ones():
    with pytest.raises(
        BatchInputError, match=r"in.txt: input files must end in .jsonl, .ndjson, .json or .csv"
    ):
        parse_rows("a\nb\n", "in.txt")
