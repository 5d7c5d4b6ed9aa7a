"""Quality gates over LLM outputs: AI-specific checks run with Great Expectations, then an outcome.

``run_suite(suite, rows)`` validates a batch (one dict per model output) and
``apply_outcome(run, rows, outcome=...)`` decides what happens: fail, quarantine failing rows, or hold
the batch to a pass-rate threshold. Airflow-free; the ``LLMOutputQualityOperator`` is the Airflow glue.
Great Expectations (the ``validation`` extra) is imported on first run, not on import of this package.
"""

from __future__ import annotations

from governed_ai.core.validation.checks import (
    DEFAULT_REFUSAL_PATTERNS,
    AnyCheck,
    Check,
    GroundedCheck,
    InSetCheck,
    JsonSchemaCheck,
    LengthCheck,
    NoPiiCheck,
    NotEmptyCheck,
    NotRefusalCheck,
    RefusalRateCheck,
    RegexCheck,
    conforms_to_schema,
    grounded,
    label_in_set,
    length_between,
    matches_regex,
    no_pii,
    not_empty,
    not_refusal,
    refusal_rate_at_most,
)
from governed_ai.core.validation.outcome import GateResult, apply_outcome, check_outcome
from governed_ai.core.validation.report import OUTCOMES, CheckReport, Example, Outcome, QualityReport, Status
from governed_ai.core.validation.rows import (
    RowsError,
    load_rows,
    merge_inputs,
    read_rows_file,
    rows_from_llm_results,
    rows_from_value,
    write_jsonl,
)
from governed_ai.core.validation.runner import CheckRun, SuiteRun, ValidationRunError, run_suite
from governed_ai.core.validation.suite import SuiteSpecError, ValidationSuite

__all__ = [
    "DEFAULT_REFUSAL_PATTERNS",
    "OUTCOMES",
    "AnyCheck",
    "Check",
    "CheckReport",
    "CheckRun",
    "Example",
    "GateResult",
    "GroundedCheck",
    "InSetCheck",
    "JsonSchemaCheck",
    "LengthCheck",
    "NoPiiCheck",
    "NotEmptyCheck",
    "NotRefusalCheck",
    "Outcome",
    "QualityReport",
    "RefusalRateCheck",
    "RegexCheck",
    "RowsError",
    "Status",
    "SuiteRun",
    "SuiteSpecError",
    "ValidationRunError",
    "ValidationSuite",
    "apply_outcome",
    "check_outcome",
    "conforms_to_schema",
    "grounded",
    "label_in_set",
    "length_between",
    "load_rows",
    "matches_regex",
    "merge_inputs",
    "no_pii",
    "not_empty",
    "not_refusal",
    "read_rows_file",
    "refusal_rate_at_most",
    "rows_from_llm_results",
    "rows_from_value",
    "run_suite",
    "write_jsonl",
]
