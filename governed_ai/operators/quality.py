"""Operator that puts a batch of LLM outputs through a Great Expectations quality gate."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.common.compat.sdk import AirflowFailException, BaseOperator

from governed_ai.core.audit import AuditRecord
from governed_ai.core.paths import provider_home
from governed_ai.core.subject import Subject
from governed_ai.core.validation.outcome import GateResult, apply_outcome, check_outcome
from governed_ai.core.validation.report import Outcome, QualityReport
from governed_ai.core.validation.rows import (
    RowsError,
    manifest,
    merge_inputs,
    read_rows_file,
    rows_from_llm_results,
    rows_from_value,
    write_jsonl,
)
from governed_ai.core.validation.runner import ValidationRunError, run_suite
from governed_ai.core.validation.suite import SuiteSpecError, ValidationSuite
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.errors import airflow_errors
from governed_ai.operators.storage import read_text
from governed_ai.plugins.links import AuditRecordsLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from governed_ai.core.governor import Governor

InputFormat = Literal["rows", "llm_results"]
_INPUT_FORMATS: tuple[str, ...] = ("rows", "llm_results")
_AUDIT_OUTCOME = {"passed": "ok", "quarantined": "quarantined", "failed": "failed"}


class LLMOutputQualityOperator(BaseOperator):
    """Validate a batch of model outputs with a Great Expectations suite, then pass, quarantine or fail.

    The suite's checks (not empty, length, allowed labels, regex, JSON-schema conformance, no PII or
    secrets, grounded in the retrieved documents, refusal rate, ...) run as real Great Expectations
    expectations over one DataFrame of the rows. What happens next is the ``outcome``:

    - ``fail``: any failed check (Great Expectations' verdict, ``mostly`` included) fails the task without
      retries, with a report of which check failed, how many rows and examples. Otherwise all rows go on.
    - ``quarantine``: rows failing any row check are set aside with their reasons; the rest go on. Only a
      failed batch check (e.g. ``refusal_rate``) fails the task.
    - ``threshold``: as ``quarantine``, and the task fails when fewer than ``threshold`` of the rows pass.

    The return value (XCom) is ``{"report": <compact JSON report>, "passed": <rows that go on>}``; when
    there are more than ``max_xcom_rows`` rows (or ``passed_path`` is set) ``passed`` is a manifest
    ``{"path": ..., "rows": n}`` of a JSON Lines file instead. Quarantined rows, each
    ``{"index", "reasons", "row"}``, go to the XCom key ``quarantine_xcom_key`` and/or the file
    ``quarantine_path``. ``governed_ai.core.validation.load_rows`` reads either form back.

    Every run writes one ``validation.run`` record to the governance audit trail, and with the OpenLineage
    provider installed the validated dataset carries a data-quality assertions facet (one assertion per
    check); without the provider nothing is emitted and nothing fails.

    :param suite: The checks: a :class:`~governed_ai.core.validation.ValidationSuite`, or the path of a
        suite JSON file. Templated (for the path).
    :param rows: The outputs to validate: a list of dicts (e.g. ``some_task.output``, or a Jinja
        ``xcom_pull`` with ``render_template_as_native_obj=True``); JSON or Python-literal text of such a
        list is parsed. Templated. Give either ``rows`` or ``rows_path``.
    :param rows_path: A ``.jsonl`` (one object per line) or ``.json`` (a list of objects) file of rows.
        Templated.
    :param input_format: ``rows`` (each item is a row) or ``llm_results`` (each item is an ``LLMOperator``
        result, e.g. the XCom of a mapped ``LLMOperator``; its parsed ``output`` fields become the row's
        fields, next to ``content``, the reply text).
    :param inputs: Optional list matched one to one with the rows, whose fields are added to each row, e.g.
        the records a mapped ``LLMOperator`` was expanded over, so each row keeps its ticket id. Templated.
    :param outcome: ``fail`` (default), ``quarantine`` or ``threshold``.
    :param threshold: For ``outcome="threshold"``: the share of rows (0..1] that must pass every row check.
    :param allow_empty: Whether an empty batch passes; by default it fails the task (an upstream task that
        produced nothing is usually a bug).
    :param quarantine_path: JSON Lines file for quarantined rows (written, possibly empty, whenever the
        outcome quarantines). Templated.
    :param quarantine_xcom_key: XCom key for quarantined rows; None to keep them out of XCom.
    :param passed_path: JSON Lines file for the rows that go on; when set, XCom carries its manifest
        instead of the rows. Templated.
    :param max_xcom_rows: Above this many rows, rows are written to a file under
        ``$AIRFLOW_HOME/governed_ai/outputs/quality/`` and XCom carries its manifest.
    :param redact_quarantined: Redact quarantined rows (with the policy's redaction settings and Airflow's
        secrets masker) before they reach XCom or the quarantine file; they may hold the very leak a
        ``no_pii`` check caught.
    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional; default
        ``governed_ai_governance_default``). Only connections the deployment lists in ``[governed_ai]
        allowed_governance_conn_ids`` may be named; any other fails the task before any call.
    """

    operator_extra_links = (AuditRecordsLink(),)

    template_fields: Sequence[str] = (
        "suite",
        "rows",
        "rows_path",
        "inputs",
        "quarantine_path",
        "passed_path",
    )
    template_fields_renderers = {"rows": "json", "inputs": "json"}
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        suite: ValidationSuite | str,
        rows: Any = None,
        rows_path: str | None = None,
        input_format: InputFormat = "rows",
        inputs: Any = None,
        outcome: Outcome = "fail",
        threshold: float | None = None,
        allow_empty: bool = False,
        quarantine_path: str | None = None,
        quarantine_xcom_key: str | None = "quarantined",
        passed_path: str | None = None,
        max_xcom_rows: int = 1000,
        redact_quarantined: bool = True,
        governance_conn_id: str = GovernanceHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Problems a DAG author can see at parse time are reported then, not at 3 a.m.
        if (rows is None) == (rows_path is None):
            raise ValueError(f"{self.task_id}: give exactly one of 'rows' (a list of dicts) or 'rows_path'.")
        if input_format not in _INPUT_FORMATS:
            raise ValueError(
                f"{self.task_id}: 'input_format' must be one of {', '.join(_INPUT_FORMATS)}; "
                f"got {input_format!r}."
            )
        try:
            check_outcome(outcome, threshold)
        except ValueError as error:
            raise ValueError(f"{self.task_id}: {error}.") from None
        if max_xcom_rows < 0:
            raise ValueError(f"{self.task_id}: 'max_xcom_rows' must be >= 0, got {max_xcom_rows}.")
        if quarantine_xcom_key is not None and not quarantine_xcom_key.strip():
            raise ValueError(f"{self.task_id}: 'quarantine_xcom_key' must be a non-empty key or None.")
        if outcome != "fail" and quarantine_xcom_key is None and quarantine_path is None:
            raise ValueError(
                f"{self.task_id}: outcome {outcome!r} sets failing rows aside, but with "
                "quarantine_xcom_key=None and no quarantine_path they would be lost; set one of them."
            )
        if isinstance(suite, str):
            if "{{" not in suite and Path(suite).is_file():
                try:
                    ValidationSuite.from_json_file(suite)
                except SuiteSpecError as error:
                    raise ValueError(f"{self.task_id}: 'suite': {error}") from None
        elif not isinstance(suite, ValidationSuite):
            raise TypeError(
                f"{self.task_id}: 'suite' must be a ValidationSuite or the path of a suite JSON file, "
                f"got {type(suite).__name__}."
            )
        self.suite = suite
        self.rows = rows
        self.rows_path = rows_path
        self.input_format = input_format
        self.inputs = inputs
        self.outcome: Outcome = outcome
        self.threshold = threshold
        self.allow_empty = allow_empty
        self.quarantine_path = quarantine_path
        self.quarantine_xcom_key = quarantine_xcom_key
        self.passed_path = passed_path
        self.max_xcom_rows = max_xcom_rows
        self.redact_quarantined = redact_quarantined
        self.governance_conn_id = governance_conn_id
        # What the last run saw and wrote, for the OpenLineage methods (called after execute).
        self._last_report: QualityReport | None = None
        self._lineage_input: tuple[str, str] | None = None
        self._lineage_outputs: list[tuple[str, str]] = []

    @cached_property
    def governance(self) -> GovernanceHook:
        with airflow_errors(self.task_id):  # a governance connection the deployment does not allow
            return GovernanceHook(governance_conn_id=self.governance_conn_id)

    # -- inputs ----------------------------------------------------------------------------------------

    def resolved_suite(self) -> ValidationSuite:
        """The suite after templating."""
        if isinstance(self.suite, ValidationSuite):
            return self.suite
        try:
            return ValidationSuite.from_json_file(str(self.suite))
        except SuiteSpecError as error:
            raise AirflowFailException(f"{self.task_id}: 'suite': {error}") from None

    def resolved_rows(self) -> list[dict[str, Any]]:
        """The rows after templating, in the configured input format, with ``inputs`` merged in."""
        try:
            if self.rows_path is not None:
                raw: Any = read_rows_file(str(self.rows_path), read_text=read_text)
                what = "rows_path"
            else:
                raw, what = self.rows, "rows"
            if self.input_format == "llm_results":
                rows = rows_from_llm_results(raw, what=what, read_text=read_text)
            else:
                rows = rows_from_value(raw, what=what, read_text=read_text)
            if self.inputs is not None:
                rows = merge_inputs(rows, self.inputs)
        except RowsError as error:
            # Retrying cannot fix what an upstream task produced.
            raise AirflowFailException(f"{self.task_id}: {error}") from None
        return rows

    # -- run -------------------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        suite = self.resolved_suite()
        rows = self.resolved_rows()
        governor = self.governance.governor
        subject = self.governance.subject_from_context(context)
        redaction = governor.engine().redaction_for(subject)

        def redact(text: str) -> str:
            return governor.redact_text(text, redaction)[0]

        try:
            run = run_suite(suite, rows, redact=redact)
        except ValidationRunError as error:
            raise AirflowFailException(f"{self.task_id}: {error}") from error
        gate = apply_outcome(
            run, rows, outcome=self.outcome, threshold=self.threshold, allow_empty=self.allow_empty
        )
        report = gate.report
        self._last_report = report
        self._lineage_input = (
            ("file", str(Path(str(self.rows_path)).resolve()))
            if self.rows_path is not None
            else ("governed_ai", f"{subject.dag_id}.{subject.task_id}.rows")
        )
        self._lineage_outputs = []

        quarantined: Any = gate.quarantined_rows
        if self.redact_quarantined and quarantined:
            quarantined, _ = governor.redact_obj(quarantined, redaction)
        if self.outcome != "fail":
            self._deliver_quarantine(context, subject, quarantined)
        passed = None if report.failed else self._deliver_passed(subject, gate)

        self._audit(governor, subject, suite, gate)
        log = self.log.error if report.failed else self.log.info
        log("%s", report.to_text())
        if report.failed:
            raise AirflowFailException(f"{self.task_id}: {report.to_text()}")
        return {"report": report.model_dump(mode="json"), "passed": passed}

    def _deliver_quarantine(self, context: Context, subject: Subject, quarantined: list[Any]) -> None:
        path: str | None = str(self.quarantine_path) if self.quarantine_path else None
        too_many = len(quarantined) > self.max_xcom_rows
        if path is None and too_many:
            path = str(_default_path(subject, "quarantined"))
        if path is not None:
            write_jsonl(path, quarantined)
            self._lineage_outputs.append(("file", str(Path(path).resolve())))
        if self.quarantine_xcom_key is not None:
            value = manifest(path, len(quarantined)) if too_many and path else quarantined
            context["ti"].xcom_push(key=self.quarantine_xcom_key, value=value)

    def _deliver_passed(self, subject: Subject, gate: GateResult) -> Any:
        rows = gate.passed_rows
        path: str | None = str(self.passed_path) if self.passed_path else None
        if path is None and len(rows) > self.max_xcom_rows:
            path = str(_default_path(subject, "passed"))
        if path is None:
            return rows
        write_jsonl(path, rows)
        self._lineage_outputs.append(("file", str(Path(path).resolve())))
        return manifest(path, len(rows))

    def _audit(self, governor: Governor, subject: Subject, suite: ValidationSuite, gate: GateResult) -> None:
        report = gate.report
        error = None
        if report.failures:
            redaction = governor.engine().redaction_for(subject)
            error, _ = governor.redact_text("; ".join(report.failures)[:2000], redaction)
        governor.record(
            AuditRecord.for_subject(
                subject,
                action="validation.run",
                resource=suite.name,
                decision="n/a",
                outcome=_AUDIT_OUTCOME[report.status],
                error=error,
                extra={
                    "outcome": report.outcome,
                    "rows": report.rows,
                    "rows_passing_all_checks": report.rows_passing_all_checks,
                    "passed_rows": report.passed_rows,
                    "quarantined_rows": report.quarantined_rows,
                    "failed_checks": report.failed_checks[:20],
                },
            )
        )

    # -- OpenLineage -----------------------------------------------------------------------------------

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """The validated dataset with a data-quality assertions facet; None without OpenLineage."""
        return self._openlineage()

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """Same as on completion: a failed gate is exactly when the assertions matter."""
        return self._openlineage()

    def _openlineage(self) -> Any:
        try:
            from airflow.providers.openlineage.extractors import OperatorLineage

            from governed_ai.core.validation.lineage import DatasetRef, quality_datasets
        except ImportError:
            return None
        try:
            if self._last_report is None or self._lineage_input is None:
                return OperatorLineage()
            inputs, outputs = quality_datasets(
                self._last_report,
                DatasetRef(*self._lineage_input),
                [DatasetRef(*ref) for ref in self._lineage_outputs],
            )
            return OperatorLineage(inputs=inputs, outputs=outputs)
        except Exception:  # lineage must never fail the task
            self.log.warning("could not build OpenLineage facets for the quality gate", exc_info=True)
            return None


def _default_path(subject: Subject, what: str) -> Path:
    run = re.sub(r"[^A-Za-z0-9_.\-]", "_", subject.run_id)
    task = subject.task_id if subject.map_index < 0 else f"{subject.task_id}.{subject.map_index}"
    return provider_home() / "outputs" / "quality" / subject.dag_id / run / f"{task}.{what}.jsonl"
