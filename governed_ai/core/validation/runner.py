"""Running a suite over a batch of rows with Great Expectations 1.x.

One ephemeral GX context per process (GX takes seconds to import and build; a context is reused for every
run), with a pandas data source, a dataframe asset and a whole-dataframe batch definition. Each distinct
suite becomes one cached ``ValidationDefinition`` that is run with ``batch_parameters={"dataframe": df}``
and the ``COMPLETE`` result format, which gives every failing row's index, so rows can be quarantined.
Progress bars are off. GX keeps each run's result in its (in-memory) results store; the runner drops them
after reading, so a long-lived worker does not grow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from governed_ai.core.extras import requires_extra
from governed_ai.core.validation.checks import CHECK_META_KEY, Check, as_text
from governed_ai.core.validation.report import CheckReport, Example
from governed_ai.core.validation.suite import ValidationSuite

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.expectations import Expectation

_RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    "return_unexpected_index_query": False,
    "partial_unexpected_count": 0,
}
_MAX_CACHED_SUITES = 64
_EXAMPLE_CHARS = 120


class ValidationRunError(RuntimeError):
    """Great Expectations could not evaluate an expectation (not the same as rows failing it)."""


@dataclass(frozen=True)
class CheckRun:
    """One check's result over the batch."""

    check: Check
    success: bool
    failed_indexes: tuple[int, ...]
    expectation_types: tuple[str, ...]
    observed_rate: float | None = None
    examples: tuple[Example, ...] = ()

    def report(self) -> CheckReport:
        return CheckReport(
            name=self.check.name,
            kind=self.check.kind,
            column=self.check.column,
            scope=self.check.scope,
            success=self.success,
            failed_rows=len(self.failed_indexes),
            required=self.check.required(),
            observed_rate=self.observed_rate,
            expectations=list(self.expectation_types),
            examples=list(self.examples),
        )


@dataclass(frozen=True)
class SuiteRun:
    """A suite's result over one batch: per check, and per failing row the reasons (row checks only)."""

    suite: ValidationSuite
    row_count: int
    checks: tuple[CheckRun, ...]
    row_reasons: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """Great Expectations' verdict over the whole suite (``mostly`` included)."""
        return all(check.success for check in self.checks)

    @property
    def rows_passing_all_checks(self) -> int:
        return self.row_count - len(self.row_reasons)


def run_suite(
    suite: ValidationSuite,
    rows: Sequence[Mapping[str, Any]],
    *,
    redact: Callable[[str], str] | None = None,
    max_examples: int = 3,
) -> SuiteRun:
    """Validate ``rows`` (one dict per model output) with ``suite``.

    ``redact`` is applied to the example values and reasons that go into reports (default: the
    governance redactor with its default detectors), since a failing value may be exactly the leak a
    check caught.
    """
    for position, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"rows[{position}] is a {type(row).__name__}, not a dict; each row must be a dict"
            )
    if not rows:
        checks = tuple(
            CheckRun(check=c, success=True, failed_indexes=(), expectation_types=()) for c in suite.checks
        )
        return SuiteRun(suite=suite, row_count=0, checks=checks)

    redact = redact or _default_redact()
    frame = _frame(rows, suite.columns)
    runtime = gx_runtime()
    expectations: list[Expectation] = []
    for check in suite.checks:
        check.add_columns(frame)
        expectations.extend(check.expectations(runtime.gx))
    result = runtime.validate(suite.name, expectations, frame)

    by_check: dict[str, list[Any]] = {check.name: [] for check in suite.checks}
    for expectation_result in result.results:
        config = expectation_result.expectation_config
        name = (config.meta or {}).get(CHECK_META_KEY) if config is not None else None
        info = expectation_result.exception_info or {}
        if info.get("raised_exception"):
            raise ValidationRunError(
                f"check {name!r}: Great Expectations could not evaluate "
                f"{config.type if config is not None else 'an expectation'}: {info.get('exception_message')}"
            )
        if name not in by_check:  # pragma: no cover - every expectation is tagged by its check
            raise ValidationRunError(f"an expectation result belongs to no check: {config}")
        by_check[name].append(expectation_result)

    check_runs: list[CheckRun] = []
    reasons: dict[int, list[str]] = {}
    for check in suite.checks:
        results = by_check[check.name]
        failed = sorted({int(i) for r in results for i in (r.result.get("unexpected_index_list") or ())})
        observed = None
        if check.scope == "batch":
            percent = results[0].result.get("unexpected_percent") if results else None
            observed = None if percent is None else round(float(percent) / 100.0, 6)
        else:
            for index in failed:
                reasons.setdefault(index, []).append(check.reason(frame, index))
        examples = tuple(
            Example(
                row=index,
                value=redact(_shorten(as_text(frame.at[index, check.column]))),
                reason=redact(check.reason(frame, index)),
            )
            for index in failed[:max_examples]
        )
        check_runs.append(
            CheckRun(
                check=check,
                success=all(bool(r.success) for r in results),
                failed_indexes=tuple(failed),
                expectation_types=tuple(dict.fromkeys(str(r.expectation_config.type) for r in results)),
                observed_rate=observed,
                examples=examples,
            )
        )
    return SuiteRun(
        suite=suite,
        row_count=len(rows),
        checks=tuple(check_runs),
        row_reasons={index: tuple(why) for index, why in sorted(reasons.items())},
    )


def _frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    with requires_extra("validation"):
        import pandas as pd

    # Object columns keep values as the model produced them (no int->float coercion around missing values).
    data = {column: pd.Series([row.get(column) for row in rows], dtype=object) for column in columns}
    return pd.DataFrame(data, index=pd.RangeIndex(len(rows)))


def _shorten(text: str) -> str:
    # One line per example in reports and logs, whatever the model wrote.
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 1] + "\u2026"


def _default_redact() -> Callable[[str], str]:
    from governed_ai.core.redaction import Redactor

    redactor = Redactor()
    return lambda text: redactor.redact(text).text


# -- the process-wide GX context -------------------------------------------------------------------------


class GxRuntime:
    """An ephemeral GX context with one pandas dataframe asset, shared by every run in the process."""

    def __init__(self) -> None:
        gx_logger = logging.getLogger("great_expectations")
        if gx_logger.level == logging.NOTSET:
            # GX logs dozens of INFO lines while importing and building a context; they would fill every
            # task log. Only when nobody configured this logger.
            gx_logger.setLevel(logging.WARNING)
        with requires_extra("validation"):
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx: ModuleType = gx
        self._context = gx.get_context(mode="ephemeral")
        self._context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = self._context.data_sources.add_pandas("governed_ai_outputs")
        asset = source.add_dataframe_asset("llm_outputs")
        self._batch_definition = asset.add_batch_definition_whole_dataframe("whole_batch")
        self._definitions: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def validate(
        self, suite_name: str, expectations: Sequence[Expectation], frame: pd.DataFrame
    ) -> ExpectationSuiteValidationResult:
        """Run the expectations over ``frame``; the validation definition is cached per distinct suite."""
        key = _fingerprint(suite_name, expectations)
        with self._lock:
            definition = self._definitions.get(key)
            if definition is None:
                definition = self._add_definition(f"{suite_name}.{key[:16]}", expectations)
                self._definitions[key] = definition
                self._evict()
            else:
                self._definitions.move_to_end(key)
            try:
                return definition.run(batch_parameters={"dataframe": frame}, result_format=_RESULT_FORMAT)
            finally:
                self._forget_results()

    def _add_definition(self, name: str, expectations: Sequence[Expectation]) -> Any:
        gx = self.gx
        suite = self._context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        return self._context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=self._batch_definition, suite=suite)
        )

    def _evict(self) -> None:
        while len(self._definitions) > _MAX_CACHED_SUITES:
            _, old = self._definitions.popitem(last=False)
            self._context.validation_definitions.delete(old.name)
            self._context.suites.delete(old.suite.name)

    def _forget_results(self) -> None:
        store = self._context.validation_results_store
        for result_key in store.list_keys():
            store.remove_key(result_key)


_RUNTIME: GxRuntime | None = None
_RUNTIME_LOCK = threading.Lock()


def gx_runtime() -> GxRuntime:
    """The process's GX runtime, created (and Great Expectations imported) on first use."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            _RUNTIME = GxRuntime()
        return _RUNTIME


def _fingerprint(suite_name: str, expectations: Sequence[Expectation]) -> str:
    configs = [expectation.configuration.to_json_dict() for expectation in expectations]
    encoded = json.dumps([suite_name, configs], sort_keys=True, default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()
