"""What a quality gate reports: compact, JSON-safe (for XCom and audit) and readable (for task logs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Outcome = Literal["fail", "quarantine", "threshold"]
"""What a gate does with failing rows: fail the task, set the rows aside, or set them aside and fail the
task only when too few rows pass."""

Status = Literal["passed", "quarantined", "failed"]
"""``passed``: nothing failed; ``quarantined``: some rows were set aside, the rest continue;
``failed``: the gate stops the pipeline."""

OUTCOMES: tuple[Outcome, ...] = ("fail", "quarantine", "threshold")


class Example(BaseModel):
    """One failing row, shortened and redacted."""

    model_config = ConfigDict(frozen=True)

    row: int = Field(description="position of the row in the batch, from 0")
    value: str = Field(description="the checked value, shortened and redacted")
    reason: str


class CheckReport(BaseModel):
    """How one check went."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    column: str
    scope: Literal["row", "batch"]
    success: bool = Field(description="Great Expectations' verdict, ``mostly`` included")
    failed_rows: int = Field(description="rows that failed at least one of the check's expectations")
    required: str = Field(description="what the check demands, e.g. 'every row' or 'refusal rate <= 20%'")
    observed_rate: float | None = Field(
        default=None, description="for batch checks: the share of (non-missing) rows that failed"
    )
    expectations: list[str] = Field(description="the Great Expectations expectation types it ran")
    examples: list[Example] = Field(default_factory=list)


class QualityReport(BaseModel):
    """The result of one gate run."""

    model_config = ConfigDict(frozen=True)

    suite: str
    outcome: Outcome
    threshold: float | None = None
    status: Status
    rows: int
    rows_passing_all_checks: int
    passed_rows: int = Field(description="rows that continue downstream")
    quarantined_rows: int
    pass_rate: float | None = Field(description="rows passing every row check / rows; None for no rows")
    checks: list[CheckReport]
    failures: list[str] = Field(default_factory=list, description="why the gate failed, one line each")

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def failed_checks(self) -> list[str]:
        """Names of the checks Great Expectations judged failed."""
        return [check.name for check in self.checks if not check.success]

    def summary(self) -> str:
        """One line: status, counts and pass rate."""
        rate = "n/a" if self.pass_rate is None else f"{self.pass_rate:.1%}"
        return (
            f"quality gate {self.suite!r} {self.status.upper()} (outcome={self.outcome}): {self.rows} rows, "
            f"{self.rows_passing_all_checks} pass every check ({rate}), {self.passed_rows} continue, "
            f"{self.quarantined_rows} quarantined"
        )

    def to_text(self) -> str:
        """A readable report: which checks failed, how many rows, and examples."""
        lines = [self.summary()]
        for check in self.checks:
            mark = "ok    " if check.success else "FAILED"
            detail = f"{check.failed_rows} of {self.rows} rows failed" if check.failed_rows else "no failures"
            if check.observed_rate is not None:
                detail += f" (rate {check.observed_rate:.1%})"
            lines.append(f"  {mark} {check.name}: {detail}; required: {check.required}")
            for example in check.examples:
                lines.append(f"           row {example.row}: {example.reason} | value: {example.value}")
        if self.failures:
            lines.append("Why the gate failed:")
            lines.extend(f"  - {failure}" for failure in self.failures)
        return "\n".join(lines)
