"""OpenLineage datasets for a gate run: the validated input with its data-quality assertions facet.

Import this module lazily (inside an operator's ``get_openlineage_facets_on_*`` methods): it needs
``openlineage-python``, which is only present with the OpenLineage provider, and raises ImportError
otherwise. Nothing here needs Airflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from openlineage.client.event_v2 import InputDataset, OutputDataset
from openlineage.client.facet_v2 import data_quality_assertions_dataset, data_quality_metrics_input_dataset

from governed_ai.core.validation.report import QualityReport


@dataclass(frozen=True)
class DatasetRef:
    """An OpenLineage dataset identity: ``namespace`` (e.g. ``file``) and ``name`` (e.g. a path)."""

    namespace: str
    name: str


def assertions(report: QualityReport) -> list[data_quality_assertions_dataset.Assertion]:
    """One assertion per check: its kind, column, verdict and what was required/observed."""
    blocking = report.outcome == "fail"
    return [
        data_quality_assertions_dataset.Assertion(
            assertion=check.kind,
            success=check.success,
            column=check.column,
            # Row checks block the pipeline only under the fail outcome; batch checks always do.
            severity="error" if blocking or check.scope == "batch" else "warn",
            name=check.name,
            expected=check.required,
            actual=(
                f"{check.failed_rows} of {report.rows} rows failed"
                + (f" (rate {check.observed_rate:.4g})" if check.observed_rate is not None else "")
            ),
            params={"expectations": ", ".join(check.expectations), "suite": report.suite},
        )
        for check in report.checks
    ]


def quality_datasets(
    report: QualityReport, validated: DatasetRef, outputs: Sequence[DatasetRef] = ()
) -> tuple[list[InputDataset], list[OutputDataset]]:
    """The validated dataset (with assertions and row count) and the files the gate wrote."""
    facets = {
        "dataQualityAssertions": data_quality_assertions_dataset.DataQualityAssertionsDatasetFacet(
            assertions=assertions(report)
        ),
        "dataQualityMetrics": data_quality_metrics_input_dataset.DataQualityMetricsInputDatasetFacet(
            columnMetrics={}, rowCount=report.rows
        ),
    }
    inputs = [InputDataset(namespace=validated.namespace, name=validated.name, inputFacets=dict(facets))]
    return inputs, [OutputDataset(namespace=o.namespace, name=o.name) for o in outputs]
