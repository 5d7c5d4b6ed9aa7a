"""What a gate does with a suite's result: fail, quarantine, or hold the rows to a pass-rate threshold.

- ``fail``: the gate fails when any check fails by Great Expectations' verdict (``mostly`` included).
  Otherwise every row continues: rows tolerated by ``mostly`` are counted in the report, not removed.
- ``quarantine``: rows failing any row check are set aside, each with its reasons; the others continue.
  The gate fails only when a batch check (e.g. the refusal rate) fails, since that cannot be blamed on
  single rows.
- ``threshold``: as ``quarantine``, and the gate also fails when fewer than ``threshold`` of the rows
  pass every row check (e.g. ``0.95``).

An empty batch fails the gate unless ``allow_empty`` is set: an upstream task that produced nothing is
usually a bug, not a clean result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from governed_ai.core.validation.report import OUTCOMES, CheckReport, Outcome, QualityReport, Status
from governed_ai.core.validation.runner import SuiteRun


@dataclass(frozen=True)
class GateResult:
    """The report plus the rows that continue and the rows set aside."""

    report: QualityReport
    passed_rows: list[Any]
    quarantined_rows: list[dict[str, Any]]
    """Each ``{"index": <position in the batch>, "reasons": [...], "row": <the row as given>}``."""

    @property
    def failed(self) -> bool:
        return self.report.failed


def check_outcome(outcome: str, threshold: float | None) -> None:
    """Raise ValueError, naming the parameter, unless ``outcome``/``threshold`` make sense together."""
    if outcome not in OUTCOMES:
        raise ValueError(f"'outcome' must be one of {', '.join(OUTCOMES)}; got {outcome!r}")
    if outcome == "threshold":
        if threshold is None:
            raise ValueError("outcome 'threshold' needs 'threshold', the share of rows that must pass (0..1]")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"'threshold' must be in (0, 1], e.g. 0.95; got {threshold}")
    elif threshold is not None:
        raise ValueError(f"'threshold' is only used with outcome 'threshold', not {outcome!r}; remove it")


def apply_outcome(
    run: SuiteRun,
    rows: list[Any],
    *,
    outcome: Outcome = "fail",
    threshold: float | None = None,
    allow_empty: bool = False,
) -> GateResult:
    """Decide the gate for ``run`` (the suite's result over ``rows``) under ``outcome``."""
    check_outcome(outcome, threshold)
    if len(rows) != run.row_count:
        raise ValueError(f"the suite ran over {run.row_count} rows but {len(rows)} rows were given")
    total = run.row_count
    failures: list[str] = []
    if total == 0 and not allow_empty:
        failures.append("no rows to validate (set allow_empty=True if an empty batch is normal)")

    if outcome == "fail":
        failures.extend(
            _check_failure(check_run.report(), total) for check_run in run.checks if not check_run.success
        )
        passed_rows = [] if failures else list(rows)
        quarantined: list[dict[str, Any]] = []
    else:
        failures.extend(
            _check_failure(check_run.report(), total)
            for check_run in run.checks
            if check_run.check.scope == "batch" and not check_run.success
        )
        passed_rows = [row for index, row in enumerate(rows) if index not in run.row_reasons]
        quarantined = [
            {"index": index, "reasons": list(reasons), "row": rows[index]}
            for index, reasons in run.row_reasons.items()
        ]

    pass_rate = run.rows_passing_all_checks / total if total else None
    if outcome == "threshold" and pass_rate is not None and threshold is not None and pass_rate < threshold:
        failures.append(
            f"pass rate {pass_rate:.1%} ({run.rows_passing_all_checks} of {total} rows) is below the "
            f"threshold {threshold:.1%}"
        )

    status: Status = "failed" if failures else ("quarantined" if quarantined else "passed")
    report = QualityReport(
        suite=run.suite.name,
        outcome=outcome,
        threshold=threshold,
        status=status,
        rows=total,
        rows_passing_all_checks=run.rows_passing_all_checks,
        passed_rows=len(passed_rows),
        quarantined_rows=len(quarantined),
        pass_rate=None if pass_rate is None else round(pass_rate, 6),
        checks=[check_run.report() for check_run in run.checks],
        failures=failures,
    )
    return GateResult(report=report, passed_rows=passed_rows, quarantined_rows=quarantined)


def _check_failure(check: CheckReport, total: int) -> str:
    rate = f"; observed rate {check.observed_rate:.1%}" if check.observed_rate is not None else ""
    return f"{check.name}: {check.failed_rows} of {total} rows failed{rate}; required: {check.required}"
