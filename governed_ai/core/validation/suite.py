"""A validation suite: a named list of checks, written in code or loaded from a JSON file.

In code::

    suite = ValidationSuite(
        name="ticket_classification",
        checks=[
            label_in_set("sentiment", ["negative", "positive"]),
            length_between("summary", max_length=160),
        ],
    )

As a JSON file (``ValidationSuite.from_json_file(path)``)::

    {"name": "ticket_classification",
     "checks": [{"kind": "in_set", "column": "sentiment", "values": ["negative", "positive"]},
                {"kind": "length", "column": "summary", "max_length": 160}]}

Check kinds: ``not_empty``, ``length``, ``in_set``, ``regex``, ``not_refusal``, ``json_schema``,
``no_pii``, ``grounded``, ``refusal_rate`` (fields as in :mod:`governed_ai.core.validation.checks`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from governed_ai.core.validation.checks import CHECK_KINDS, AnyCheck, Check


class SuiteSpecError(ValueError):
    """A suite definition is wrong; the message names the file, the field and what to change."""


class ValidationSuite(BaseModel):
    """A named, ordered set of checks run together over one batch of outputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    checks: tuple[AnyCheck, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_check_names(self) -> ValidationSuite:
        counts = Counter(check.name for check in self.checks)
        duplicated = sorted(name for name, n in counts.items() if n > 1)
        if duplicated:
            raise ValueError(
                f"check names must be unique; used more than once: {duplicated}. "
                "Give the checks on the same column a distinct 'name'."
            )
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """Every row field some check reads, in first-use order."""
        seen: dict[str, None] = {}
        for check in self.checks:
            for column in check.columns():
                seen.setdefault(column, None)
        return tuple(seen)

    def check(self, name: str) -> Check:
        """The check called ``name``."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"suite {self.name!r} has no check {name!r}")

    # -- JSON ----------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "suite") -> ValidationSuite:
        """Validate a parsed suite definition; errors name ``source`` and each wrong field."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise SuiteSpecError(_describe(error, source)) from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "suite JSON") -> ValidationSuite:
        """Parse and validate a suite written as JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SuiteSpecError(
                f"{source} is not valid JSON: line {error.lineno} column {error.colno}: {error.msg}"
            ) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> ValidationSuite:
        """Load a suite from a JSON file."""
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SuiteSpecError(f"suite file {file} does not exist") from None
        except OSError as error:
            raise SuiteSpecError(f"suite file {file} cannot be read: {error}") from None
        return cls.from_json(text, source=f"suite file {file}")

    def to_dict(self) -> dict[str, Any]:
        """The suite as JSON-able data, without fields left at their defaults."""
        data: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            data["description"] = self.description
        data["checks"] = [check.spec() for check in self.checks]
        return data

    def to_json(self, *, indent: int | None = 2) -> str:
        """The suite as JSON that :meth:`from_json` reads back."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def _describe(error: ValidationError, source: str) -> str:
    items = error.errors(include_url=False)
    if any(len(item["loc"]) > 1 and item["loc"][0] == "checks" for item in items):
        # pydantic also reports the list as too short once its bad items are dropped: noise.
        items = [item for item in items if not (item["loc"] == ("checks",) and item["type"] == "too_short")]
    lines = [f"{source} is not a valid validation suite ({len(items)} problem(s)):"]
    for item in items:
        message = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"  - {_location(item['loc'])}: {message}")
    lines.append(f"Check kinds: {', '.join(CHECK_KINDS)}.")
    return "\n".join(lines)


def _location(loc: tuple[int | str, ...]) -> str:
    """``('checks', 2, 'in_set', 'values')`` -> ``checks[2].values`` (pydantic puts the kind in the path)."""
    parts: list[str] = []
    previous: int | str | None = None
    for element in loc:
        if isinstance(element, int):
            parts.append(f"[{element}]")
        elif isinstance(previous, int) and element in CHECK_KINDS:
            pass  # the discriminator tag pydantic inserts after a list index
        else:
            parts.append(f".{element}" if parts else str(element))
        previous = element
    return "".join(parts) or "(whole suite)"
