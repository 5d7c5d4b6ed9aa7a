"""Getting a batch of model outputs into rows (one dict each), and writing rows out as JSON Lines.

Rows come as a list of dicts (e.g. from XCom), as JSON or Python-literal text (what a Jinja template
renders when ``render_template_as_native_obj`` is off), from a ``.json``/``.jsonl`` file, or as the
results of ``LLMOperator`` calls, whose parsed ``output`` fields become the row's fields.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from governed_ai.core.errors import InvalidInput
from governed_ai.core.xcom import is_rows_manifest, rows_manifest

#: What a gate puts in XCom instead of the rows when they are many (see :mod:`governed_ai.core.xcom`).
Manifest = dict[str, Any]
#: Reads a file's text from a local path or a URI (operators pass one that knows object storage).
TextReader = Callable[[str], str]


class RowsError(InvalidInput):
    """The input is not a batch of rows; the message says where and what was expected."""


def read_local_text(location: str) -> str:
    """The text of a local path or ``file://`` URI; other URIs need a reader that knows object storage."""
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        raise RowsError(
            f"{location!r} is in object storage; read it through an operator (it passes a reader that "
            "knows object storage), or pass read_text= here"
        )
    return Path(parsed.path if parsed.scheme == "file" else location).read_text(encoding="utf-8")


def rows_from_value(
    value: Any, *, what: str = "rows", read_text: TextReader = read_local_text
) -> list[dict[str, Any]]:
    """A list of dict rows from a list/sequence of dicts, a manifest, or JSON/Python-literal text."""
    if isinstance(value, str):
        value = _parse_text(value, what)
    if isinstance(value, Mapping):
        if is_rows_manifest(value):
            return read_rows_file(value["results_path"], read_text=read_text)
        # An LLMBatchOperator result with its rows inline.
        if isinstance(value.get("results"), list):
            return rows_from_value(value["results"], what=what, read_text=read_text)
        raise RowsError(f"'{what}' is a single dict; give a list of dicts (one per model output)")
    if value is None or isinstance(value, bytes) or not isinstance(value, Iterable):
        raise RowsError(f"'{what}' must be a list of dicts, got {type(value).__name__}")
    # Mapped tasks' XCom arrives as a lazy sequence: materialise it once.
    rows = list(value)
    for position, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise RowsError(
                f"{what}[{position}] is a {type(row).__name__}, not a dict; each row must be a dict of fields"
            )
    return [dict(row) for row in rows]


def _parse_text(text: str, what: str) -> Any:
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    try:
        # A list rendered by Jinja without native rendering is its Python repr (single quotes, True/None).
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError):
        raise RowsError(
            f"'{what}' is text that is neither JSON nor a Python literal list: {stripped[:80]!r}. Pass a "
            "list (e.g. an XComArg, or set render_template_as_native_obj=True on the DAG) or use 'rows_path'."
        ) from None


def read_rows_file(
    path: str | os.PathLike[str], *, read_text: TextReader = read_local_text
) -> list[dict[str, Any]]:
    """Rows from a ``.jsonl`` file (one JSON object per line) or a ``.json`` file (a list of objects),
    local or (with a ``read_text`` that knows it) in object storage."""
    file = str(path)
    try:
        text = read_text(file)
    except FileNotFoundError:
        raise RowsError(f"rows file {file} does not exist") from None
    if file.endswith(".jsonl"):
        rows: list[Any] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise RowsError(f"rows file {file}, line {number}: not valid JSON: {error}") from None
        return rows_from_value(rows, what=f"rows file {file}, row")
    try:
        data = json.loads(text)
    except ValueError as error:
        raise RowsError(f"rows file {file} is not valid JSON: {error}") from None
    return rows_from_value(data, what=f"rows file {file}")


def rows_from_llm_results(
    results: Any, *, what: str = "rows", read_text: TextReader = read_local_text
) -> list[dict[str, Any]]:
    """Rows from ``LLMOperator`` or ``LLMBatchOperator`` results: ``{"content": <reply>, **<output>}``.

    The reply text stays available as ``content``; with an ``output_schema`` the parsed fields sit next
    to it (a field called ``content`` in the schema wins over the reply text).
    """
    rows = rows_from_value(results, what=what, read_text=read_text)
    out: list[dict[str, Any]] = []
    for position, result in enumerate(rows):
        if result.get("status") in ("failed", "not_run") and "content" not in result:
            # A batch item that produced nothing: a row without a reply, which the checks then reject.
            out.append({"content": None, "error": result.get("error")})
            continue
        if "content" not in result or "output" not in result:
            raise RowsError(
                f"{what}[{position}] is not an LLMOperator result (it has no 'content'/'output' keys); "
                "use input_format='rows' for plain rows"
            )
        row: dict[str, Any] = {"content": result["content"]}
        output = result["output"]
        if isinstance(output, Mapping):
            row.update(output)
        elif output is not None:
            row["output"] = output
        out.append(row)
    return out


def merge_inputs(rows: list[dict[str, Any]], inputs: Any, *, what: str = "inputs") -> list[dict[str, Any]]:
    """Add to each row the fields of the input it was produced from (e.g. the ticket id), one to one.

    ``inputs`` is typically the list a mapped ``LLMOperator`` was expanded over; a non-dict input is
    added as the field ``input``. Output fields win over input fields of the same name.
    """
    if isinstance(inputs, str):
        inputs = _parse_text(inputs, what)
    if isinstance(inputs, Mapping) or not isinstance(inputs, Iterable):
        raise RowsError(f"'{what}' must be a list with one entry per row, got {type(inputs).__name__}")
    items = list(inputs)
    if len(items) != len(rows):
        raise RowsError(
            f"'{what}' has {len(items)} entries but there are {len(rows)} rows; they are matched one to one"
        )
    return [
        {**(dict(item) if isinstance(item, Mapping) else {"input": item}), **row}
        for item, row in zip(items, rows, strict=True)
    ]


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Any]) -> int:
    """Write rows as JSON Lines (creating parent directories); returns how many were written."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with file.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str))
            handle.write("\n")
            written += 1
    return written


def manifest(path: str | os.PathLike[str], rows: int) -> Manifest:
    """What XCom carries instead of rows written to a file."""
    return rows_manifest(str(path), None, rows=rows)


def load_rows(value: Any, *, read_text: TextReader = read_local_text) -> list[dict[str, Any]]:
    """The rows a gate or a batch passed on: its XCom value holds the rows themselves or a file manifest."""
    return rows_from_value(value, read_text=read_text)
