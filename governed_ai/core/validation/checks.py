"""The checks that matter for AI outputs, each compiled to real Great Expectations expectations.

A check is a small pydantic spec (so a suite can live in code or in a JSON file). At run time it adds
the columns its expectations need to the batch's DataFrame and yields the GX expectations; GX decides
which rows fail. Where GX has an expectation for the job it is used directly (not null, lengths, value
sets, regexes, regex lists); where a row needs AI-specific judgement (schema conformance, PII, whether the
answer cites what was retrieved) the check computes one boolean column per row and GX checks that
column with ``mostly``, so counts, ``mostly`` and per-row indexes all come from GX.

Row checks mark individual rows as failing (those rows can be quarantined). Batch checks judge the batch
as a whole (e.g. the refusal rate); a failing batch check cannot be blamed on single rows.

Like every GX column-map expectation, the value checks skip missing values; row checks therefore add a
``not null`` expectation for their column unless ``allow_missing=True``. Values that are not strings are
checked by their text form (GX converts them with ``str``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ImportString,
    ValidationError,
    field_validator,
    model_validator,
)

from governed_ai.core.extras import requires_extra
from governed_ai.core.redaction import RedactionSettings, Redactor

if TYPE_CHECKING:
    from types import ModuleType

    import pandas as pd
    from great_expectations.expectations import Expectation

Scope = Literal["row", "batch"]

#: Key in every expectation's ``meta`` naming the check it belongs to.
CHECK_META_KEY = "governed_ai_check"

# What "I don't know" looks like. Case-insensitive, searched anywhere in the text (GX regex semantics).
# Deliberately conservative: a false positive quarantines a good answer.
_APOSTROPHE = "['\u2019]"
DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    rf"(?i)\bI (?:do not|don{_APOSTROPHE}?t) know\b",
    rf"(?i)\bI(?: am|{_APOSTROPHE}m) not sure\b",
    rf"(?i)\bI (?:cannot|can{_APOSTROPHE}?t|can not|am unable to|{_APOSTROPHE}m unable to|am not able to) "
    r"(?:help|answer|assist|provide|say|tell|determine|find)\b",
    r"(?i)\bas an AI\b",
    r"(?i)\b(?:not enough|no|insufficient) (?:information|context) (?:to|is available|was provided)\b",
    r"(?i)^\s*(?:unknown|n/?a|none|no answer)\s*[.!]?\s*$",
)

_MAX_REASON_VALUE = 60
_REFUSAL_REASON = 'looks like a refusal or "I don\'t know"'


def is_missing(value: Any) -> bool:
    """None or NaN: what GX counts as null in a pandas column."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def as_text(value: Any) -> str:
    """A value as text: strings as they are, everything else as compact JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
    except ValueError:  # circular structures
        return str(value)


def _short(value: Any, limit: int = _MAX_REASON_VALUE) -> str:
    text = as_text(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"


class Check(BaseModel):
    """Fields every check has. ``name`` defaults to ``<kind>:<column>`` and must be unique in a suite."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    scope: ClassVar[Scope] = "row"

    kind: str
    column: str = Field(min_length=1, description="the row field the check looks at")
    name: str = Field(default="", description="unique within the suite; default '<kind>:<column>'")
    description: str | None = None

    @model_validator(mode="after")
    def _default_name(self) -> Check:
        if not self.name:
            # Frozen model: the default is derived once, at construction.
            object.__setattr__(self, "name", f"{self.kind}:{self.column}")
        return self

    # -- what the runner calls -------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """The check as JSON-able data (its ``kind`` first, defaults left out), as a suite file holds it."""
        data: dict[str, Any] = {"kind": self.kind}
        data.update(self.model_dump(mode="json", exclude_defaults=True, exclude={"kind"}))
        if data.get("name") == f"{self.kind}:{self.column}":
            del data["name"]
        return data

    def columns(self) -> tuple[str, ...]:
        """The row fields the check reads."""
        return (self.column,)

    def add_columns(self, frame: pd.DataFrame) -> None:
        """Add the derived columns this check's expectations read (default: none)."""

    def expectations(self, gx: ModuleType) -> list[Expectation]:
        """The GX expectations for this check, each tagged with the check's name in ``meta``."""
        raise NotImplementedError

    def reason(self, frame: pd.DataFrame, index: int) -> str:
        """Why row ``index`` failed this check, in a few words (never more than a short excerpt of it)."""
        raise NotImplementedError

    def required(self) -> str:
        """What the check demands, for reports."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------------

    def _meta(self) -> dict[str, str]:
        return {CHECK_META_KEY: self.name}

    def _derived(self, what: str) -> str:
        return f"__{self.name}__{what}"


class RowCheck(Check):
    """A check every row must pass. ``mostly`` is GX's: the share of rows that must pass for the
    expectation to succeed (it decides the ``fail`` outcome; quarantine sets aside every failing row)."""

    mostly: float = Field(default=1.0, ge=0.0, le=1.0)
    allow_missing: bool = Field(default=False, description="whether a missing value passes")

    def required(self) -> str:
        return "every row" if self.mostly >= 1.0 else f"at least {_percent(self.mostly)} of rows"

    def _presence(self, gx: ModuleType) -> list[Expectation]:
        if self.allow_missing:
            return []
        return [
            gx.expectations.ExpectColumnValuesToNotBeNull(
                column=self.column, mostly=self.mostly, meta=self._meta()
            )
        ]

    def reason(self, frame: pd.DataFrame, index: int) -> str:
        value = frame.at[index, self.column]
        if is_missing(value) and not self.allow_missing:
            return f"{self.name}: missing"
        return f"{self.name}: {self._why(value, frame, index)}"

    def _why(self, value: Any, frame: pd.DataFrame, index: int) -> str:
        raise NotImplementedError


class BatchCheck(Check):
    """A check on the batch as a whole; its failure fails the gate whatever the outcome."""

    scope: ClassVar[Scope] = "batch"


# -- row checks: plain GX expectations ----------------------------------------------------------------


class NotEmptyCheck(RowCheck):
    """The value is present and not blank (at least one non-whitespace character)."""

    kind: Literal["not_empty"] = "not_empty"

    def expectations(self, gx: ModuleType) -> list[Expectation]:
        return [
            *self._presence(gx),
            gx.expectations.ExpectColumnValuesToMatchRegex(
                column=self.column, regex=r"\S", mostly=self.mostly, meta=self._meta()
            ),
        ]

    def _why(self, value: Any, frame: pd.DataFrame, index: int) -> str:
        return "blank"


class LengthCheck(RowCheck):
    """The text is between ``min_length`` and ``max_length`` characters (inclusive)."""

    kind: Literal["length"] = "length"
    min_length: int | None = Field(default=None, ge=0)
    max_length: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> LengthCheck:
        if self.min_length is None and self.max_length is None:
            raise ValueError("give min_length, max_length or both")
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} is greater than max_length {self.max_length}")
        return self

    def expectations(self, gx: ModuleType) -> list[Expectation]:
        return [
            *self._presence(gx),
            gx.expectations.ExpectColumnValueLengthsToBeBetween(
                column=self.column,
                min_value=self.min_length,
                max_value=self.max_length,
                mostly=self.mostly,
                meta=self._meta(),
            ),
        ]

    def _why(self, value: Any, frame: pd.DataFrame, index: int) -> str:
        if self.max_length is None:
            expected = f"at least {self.min_length}"
        elif self.min_length is None:
            expected = f"at most {self.max_length}"
        else:
            expected = f"{self.min_length} to {self.max_length}"
        return f"{len(str(value))} characters, expected {expected}"


class InSetCheck(RowCheck):
    """The value is one of ``values`` (e.g. a label in the allowed set)."""

    kind: Literal["in_set"] = "in_set"
    values: tuple[str | int | float | bool, ...] = Field(min_length=1)

    def expectations(self, gx: ModuleType) -> list[Expectation]:
        return [
            *self._presence(gx),
            gx.expectations.ExpectColumnValuesToBeInSet(
                column=self.column, value_set=list(self.values), mostly=self.mostly, meta=self._meta()
            ),
        ]

    def _why(self, value: Any, frame: pd.DataFrame, index: int) -> str:
        allowed = ", ".join(repr(v) for v in self.values[:10]) + (", ..." if len(self.values) > 10 else "")
        return f"{_short(value)!r} is not one of {allowed}"


class RegexCheck(RowCheck):
    """The text matches ``pattern`` somewhere (GX semantics: a search; anchor with ``^...$`` for a full
    match). Inline flags such as ``(?i)`` work."""

    kind: Literal["regex"] = "regex"
    pattern: str = Field(min_length=1)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from None
        return pattern

    def expectations(self, gx: ModuleType) -> list[Expectation]:
        return [
            *self._presence(gx),
            gx.expectations.ExpectColumnValuesToMatchRegex(
                column=self.column, regex=self.pattern, mostly=self.mostly, meta=self._meta()
            ),
        ]

    def _why(self, value: Any, frame: pd.DataFrame, index: int) -> str:
        return f"does not match the pattern {self.pattern}"


class _RefusalPatterns(BaseModel):
    patterns: tuple[str, ...] = Field(default=(), description="extra refusal regexes")
    use_default_patterns: bool = Field(default=True, description="also use DEFAULT_REFUSAL_PATTERNS")

    @field_validator("patterns")
    @classmethod
    def _compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"patterns[{i}] is not a valid regular expression: {error}") from None
        return patterns

    @model_validator(mode="after")
    def _some_pattern(self) -> _RefusalPatterns:
        if not self.regex_list():
            raise ValueError("no refusal patterns: give 'patterns' or keep use_default_patterns=true")
        return self

    def regex_list(self) -> list[str]:
        return [*(DEFAULT_REFUSAL_PATTERNS if self.use_default_patterns else ()), *self.patterns]


class NotRefusalCheck(_RefusalPatterns, RowCheck):
    """The answer is not a refusal or "I don't know" (so refusals can be quarantined row by row)."""

    kind: Literal["not_refusal"] = "not_refusal"

    def expectations(self, gx: ModuleType) -> list[Expectation]:
        return [
            *self._presence(gx),
            gx.expectations.ExpectColumnValuesToNotMatchRegexList(
                column=self.column, regex_list=self.regex_list(), mostly=self.mostly, meta=self._meta()
            ),
        ]

    def _why(self, value: Any, frame: pd.DataFrame, index: int) -> str:
        return _REFUSAL_REASON


# -- row checks: one derived boolean column, checked by GX --------------------------------------------


class _DerivedRowCheck(RowCheck):
    """A row check that computes ``ok`` (bool) and ``detail`` (why not) per row; GX checks ``ok``.

    Missing values are left to the presence expectation (``ok`` is True for them)."""

    def _judge(self, frame: pd.DataFrame) -> Callable[[Any, Any], str | None]:
        """A function of (present value, row index): None when the value passes, else what is wrong."""
        raise NotImplementedError

    def add_columns(self, frame: pd.DataFrame) -> None:
        judge = self._judge(frame)
        details = [
            None if is_missing(value) else judge(value, index)
            for index, value in zip(frame.index, frame[self.column], strict=True)
        ]
        frame[self._derived("ok")] = [detail is None for detail in details]
        frame[self._derived("detail")] = details

    def expectations(self, gx: ModuleType) -> list[Expectation]:
        return [
            *self._presence(gx),
            gx.expectations.ExpectColumnValuesToBeInSet(
                column=self._derived("ok"), value_set=[True], mostly=self.mostly, meta=self._meta()
            ),
        ]

    def _why(self, value: Any, frame: pd.DataFrame, index: int) -> str:
        return str(frame.at[index, self._derived("detail")])


class JsonSchemaCheck(_DerivedRowCheck):
    """The value (a dict, or a JSON string) conforms to a JSON schema or to a pydantic model.

    ``mostly`` turns this into a conformance-rate expectation, e.g. ``mostly=0.98``. ``model`` is a
    pydantic class, in code, or its import path (``"package.module.ClassName"``) in a JSON suite file.
    """

    kind: Literal["json_schema"] = "json_schema"
    json_schema: dict[str, Any] | None = Field(default=None, description="a JSON Schema document")
    model: ImportString[Any] | None = Field(default=None, description="a pydantic model class")

    @model_validator(mode="after")
    def _one_schema(self) -> JsonSchemaCheck:
        if (self.json_schema is None) == (self.model is None):
            raise ValueError("give exactly one of json_schema (a JSON Schema) or model (a pydantic class)")
        if self.model is not None and not (
            isinstance(self.model, type) and issubclass(self.model, BaseModel)
        ):
            raise ValueError(f"model must be a pydantic model class, got {self.model!r}")
        if self.json_schema is not None:
            with requires_extra("validation"):
                from jsonschema import SchemaError, validators

            try:
                validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except SchemaError as error:
                where = "/".join(str(p) for p in error.path) or "(root)"
                raise ValueError(
                    f"json_schema is not a valid JSON Schema at {where}: {error.message}"
                ) from None
        return self

    def _judge(self, frame: pd.DataFrame) -> Callable[[Any, Any], str | None]:
        if self.model is not None:
            model: type[BaseModel] = self.model

            def with_model(value: Any, index: Any) -> str | None:
                try:
                    if isinstance(value, str | bytes):
                        model.model_validate_json(value)
                    else:
                        model.model_validate(value)
                except ValidationError as error:
                    first = error.errors(include_url=False)[0]
                    where = ".".join(str(p) for p in first["loc"]) or "(whole value)"
                    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
                    return f"{where}: {_short(first['msg'], 120)}{more}"
                return None

            return with_model

        with requires_extra("validation"):
            from jsonschema import validators
            from jsonschema.exceptions import best_match

        schema = self.json_schema or {}
        validator = validators.validator_for(schema)(schema)

        def with_schema(value: Any, index: Any) -> str | None:
            if isinstance(value, str | bytes):
                try:
                    value = json.loads(value)
                except ValueError as not_json:
                    return f"not JSON: {not_json}"
            worst = best_match(validator.iter_errors(value))
            if worst is None:
                return None
            where = "/".join(str(p) for p in worst.absolute_path) or "(whole value)"
            return f"{where}: {_short(worst.message, 120)}"

        return with_schema


class NoPiiCheck(_DerivedRowCheck):
    """No secrets or personal data in the value, found with the governance redactor's detectors
    (credentials and API keys, e-mail addresses, phone numbers, payment cards, IBANs, custom patterns).

    ``redaction`` chooses the detectors exactly as in :class:`RedactionSettings`. A missing value has
    nothing to leak, so ``allow_missing`` defaults to True here.
    """

    kind: Literal["no_pii"] = "no_pii"
    allow_missing: bool = True
    redaction: RedactionSettings = Field(default_factory=RedactionSettings)

    def _judge(self, frame: pd.DataFrame) -> Callable[[Any, Any], str | None]:
        redactor = Redactor(self.redaction)

        def judge(value: Any, index: Any) -> str | None:
            if isinstance(value, str):
                kinds = {finding.kind for finding in redactor.redact(value).findings}
            else:
                kinds = {finding.kind for finding in redactor.redact_obj_detailed(value).findings}
            return f"contains {', '.join(sorted(kinds))}" if kinds else None

        return judge


class GroundedCheck(_DerivedRowCheck):
    """The answer cites at least one of the documents it was given.

    ``column`` holds either the cited document ids (a list, or a JSON list string) or the answer text, in
    which a retrieved id counts as cited when it appears as a whole word. ``retrieved_column`` holds
    the ids that were retrieved for that row: a list of ids, or of dicts with an ``id`` key (retrieval
    results as they come). With ``require_known_citations`` a cited id that was not retrieved (an
    invented citation) also fails the row; this needs a list of cited ids.
    """

    kind: Literal["grounded"] = "grounded"
    retrieved_column: str = Field(min_length=1)
    require_known_citations: bool = False

    def columns(self) -> tuple[str, ...]:
        return (self.column, self.retrieved_column)

    def _judge(self, frame: pd.DataFrame) -> Callable[[Any, Any], str | None]:
        retrieved_values = frame[self.retrieved_column]

        def judge(value: Any, index: Any) -> str | None:
            retrieved = _ids(retrieved_values.at[index])
            if not retrieved:
                return "no documents were retrieved, so the answer cannot be grounded"
            cited = _ids_or_none(value)
            if cited is None:  # answer text: look for the retrieved ids in it
                text = as_text(value)
                cited = [doc_id for doc_id in retrieved if _mentions(text, doc_id)]
            known = set(retrieved)
            if not known.intersection(cited):
                return f"cites none of the retrieved documents ({_short(', '.join(retrieved))})"
            if self.require_known_citations:
                invented = [doc_id for doc_id in cited if doc_id not in known]
                if invented:
                    return f"cites documents that were not retrieved: {_short(', '.join(invented))}"
            return None

        return judge


def _mentions(text: str, doc_id: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(doc_id)}(?![\w-])", text) is not None


def _ids_or_none(value: Any) -> list[str] | None:
    """Ids from a list (or JSON list string); None when the value is free text."""
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped.startswith("["):
            return None
        try:
            value = json.loads(stripped)
        except ValueError:
            return None
    if isinstance(value, list | tuple):
        return [str(item["id"]) if isinstance(item, dict) and "id" in item else str(item) for item in value]
    return None


def _ids(value: Any) -> list[str]:
    if is_missing(value):
        return []
    ids = _ids_or_none(value)
    return ids if ids is not None else [str(value)]


# -- batch checks -------------------------------------------------------------------------------------


class RefusalRateCheck(_RefusalPatterns, BatchCheck):
    """At most ``max_rate`` of the answers are refusals / "I don't know".

    GX ``expect_column_values_to_not_match_regex_list`` with ``mostly = 1 - max_rate``: the rate is over
    the rows that have an answer (missing answers are not_empty's business).
    """

    kind: Literal["refusal_rate"] = "refusal_rate"
    max_rate: float = Field(ge=0.0, le=1.0)

    def expectations(self, gx: ModuleType) -> list[Expectation]:
        return [
            gx.expectations.ExpectColumnValuesToNotMatchRegexList(
                column=self.column,
                regex_list=self.regex_list(),
                # Rounded: 1 - 0.7 is 0.30000000000000004, which would move the boundary.
                mostly=round(1.0 - self.max_rate, 12),
                meta=self._meta(),
            )
        ]

    def required(self) -> str:
        return f"refusal rate <= {_percent(self.max_rate)}"

    def reason(self, frame: pd.DataFrame, index: int) -> str:
        return f"{self.name}: {_REFUSAL_REASON}"


AnyCheck = Annotated[
    NotEmptyCheck
    | LengthCheck
    | InSetCheck
    | RegexCheck
    | NotRefusalCheck
    | JsonSchemaCheck
    | NoPiiCheck
    | GroundedCheck
    | RefusalRateCheck,
    Field(discriminator="kind"),
]
CHECK_KINDS: tuple[str, ...] = (
    "not_empty",
    "length",
    "in_set",
    "regex",
    "not_refusal",
    "json_schema",
    "no_pii",
    "grounded",
    "refusal_rate",
)


# -- builders: what suites are written with -----------------------------------------------------------


def not_empty(column: str, *, mostly: float = 1.0, name: str = "") -> NotEmptyCheck:
    """The output is present and not blank."""
    return NotEmptyCheck(column=column, mostly=mostly, name=name)


def length_between(
    column: str,
    *,
    min_length: int | None = None,
    max_length: int | None = None,
    mostly: float = 1.0,
    name: str = "",
) -> LengthCheck:
    """The output is between ``min_length`` and ``max_length`` characters."""
    return LengthCheck(column=column, min_length=min_length, max_length=max_length, mostly=mostly, name=name)


def label_in_set(
    column: str, values: Sequence[str | int | float | bool], *, mostly: float = 1.0, name: str = ""
) -> InSetCheck:
    """The label is one of the allowed values."""
    return InSetCheck(column=column, values=tuple(values), mostly=mostly, name=name)


def matches_regex(column: str, pattern: str, *, mostly: float = 1.0, name: str = "") -> RegexCheck:
    """The output matches ``pattern`` (a search; anchor it for a full match)."""
    return RegexCheck(column=column, pattern=pattern, mostly=mostly, name=name)


def conforms_to_schema(
    column: str,
    *,
    model: type[BaseModel] | str | None = None,
    json_schema: dict[str, Any] | None = None,
    mostly: float = 1.0,
    name: str = "",
) -> JsonSchemaCheck:
    """The output validates against a pydantic model or a JSON Schema; ``mostly`` is the required rate."""
    return JsonSchemaCheck(column=column, model=model, json_schema=json_schema, mostly=mostly, name=name)


def no_pii(
    column: str, *, redaction: RedactionSettings | None = None, mostly: float = 1.0, name: str = ""
) -> NoPiiCheck:
    """No secrets or personal data in the output (the governance redactor's detectors)."""
    return NoPiiCheck(column=column, redaction=redaction or RedactionSettings(), mostly=mostly, name=name)


def grounded(
    column: str,
    retrieved_column: str,
    *,
    require_known_citations: bool = False,
    mostly: float = 1.0,
    name: str = "",
) -> GroundedCheck:
    """The answer cites at least one retrieved document (see :class:`GroundedCheck`)."""
    return GroundedCheck(
        column=column,
        retrieved_column=retrieved_column,
        require_known_citations=require_known_citations,
        mostly=mostly,
        name=name,
    )


def not_refusal(
    column: str,
    *,
    patterns: Sequence[str] = (),
    use_default_patterns: bool = True,
    mostly: float = 1.0,
    name: str = "",
) -> NotRefusalCheck:
    """The answer is not a refusal / "I don't know" (row by row)."""
    return NotRefusalCheck(
        column=column,
        patterns=tuple(patterns),
        use_default_patterns=use_default_patterns,
        mostly=mostly,
        name=name,
    )


def refusal_rate_at_most(
    column: str,
    max_rate: float,
    *,
    patterns: Sequence[str] = (),
    use_default_patterns: bool = True,
    name: str = "",
) -> RefusalRateCheck:
    """At most ``max_rate`` of the answers are refusals (a batch check)."""
    return RefusalRateCheck(
        column=column,
        max_rate=max_rate,
        patterns=tuple(patterns),
        use_default_patterns=use_default_patterns,
        name=name,
    )
