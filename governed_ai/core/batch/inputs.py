"""Batch items: where they come from (a list, JSONL or CSV text) and the stable key each one gets.

The key identifies an item across retries of the task (the replay journal is keyed by it), so it is
either taken from a field the caller names (``key_field``) or derived from the item's content: never
from its position, which changes when the input is reordered.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from governed_ai.core.audit import canonical_json
from governed_ai.core.errors import InvalidInput


class BatchInputError(InvalidInput):
    """The batch input is malformed; the message names the item (line/position) and the problem."""


@dataclass(frozen=True)
class BatchItem:
    """One unit of batch work: ``data`` is what the prompt template sees as ``item``."""

    key: str
    data: Any
    position: int


def content_key(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()[:24]


def make_items(rows: Iterable[Any], key_field: str | None = None) -> list[BatchItem]:
    """Items with keys; duplicate keys are an error (two items would share one journal entry)."""
    items: list[BatchItem] = []
    seen: dict[str, int] = {}
    for position, data in enumerate(rows):
        if key_field is not None:
            if not isinstance(data, Mapping) or data.get(key_field) in (None, ""):
                # The item itself stays out of the message: it is data, and the task log is not redacted.
                fields = sorted(str(k) for k in data)[:20] if isinstance(data, Mapping) else None
                raise BatchInputError(
                    f"item {position} has no {key_field!r} field (key_field); every item needs one "
                    + (
                        f"(its fields: {fields})"
                        if fields is not None
                        else f"(it is a {type(data).__name__})"
                    )
                )
            key = str(data[key_field])
        else:
            try:
                key = content_key(data)
            except (TypeError, ValueError) as error:
                raise BatchInputError(f"item {position} is not JSON-serialisable: {error}") from None
        if key in seen:
            how = f"{key_field!r} value" if key_field else "content"
            raise BatchInputError(
                f"items {seen[key]} and {position} have the same {how}; keys must be unique so each item "
                "is journaled once (set key_field to a unique id, or remove the duplicate)"
            )
        seen[key] = position
        items.append(BatchItem(key=key, data=data, position=position))
    return items


def parse_jsonl(text: str, source: str) -> list[Any]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise BatchInputError(f"{source} line {number} is not valid JSON: {error.msg}") from None
    return rows


def parse_csv(text: str, source: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise BatchInputError(f"{source} has no header row; a CSV input needs column names")
    return [dict(row) for row in reader]


def parse_rows(text: str, source: str) -> list[Any]:
    """Rows of a ``.jsonl``/``.ndjson``, ``.json`` (a list) or ``.csv`` file's text, by its suffix."""
    lowered = source.lower()
    if lowered.endswith((".jsonl", ".ndjson")):
        return parse_jsonl(text, source)
    if lowered.endswith(".csv"):
        return parse_csv(text, source)
    if lowered.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise BatchInputError(
                f"{source} is not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}"
            ) from None
        if not isinstance(data, list):
            raise BatchInputError(f"{source} must hold a JSON list of items, got {type(data).__name__}")
        return data
    raise BatchInputError(f"{source}: input files must end in .jsonl, .ndjson, .json or .csv")
