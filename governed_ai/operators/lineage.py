"""OpenLineage for the provider's operators: built lazily, and never allowed to fail a task."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def operator_lineage(build: Callable[[Any, Any], tuple[list[Any], list[Any], Any]]) -> Any:
    """``OperatorLineage`` from ``build(lineage_module, OperatorLineage)`` -> (inputs, outputs, facet).

    None when the OpenLineage provider is not installed, or when building fails (logged): lineage is an
    observer of the task, not part of it.
    """
    try:
        from airflow.providers.openlineage.extractors import OperatorLineage

        from governed_ai.core.observability import lineage
    except ImportError:
        return None
    try:
        inputs, outputs, facet = build(lineage, OperatorLineage)
        run_facets = {lineage.FACET_KEY: facet} if facet is not None else {}
        return OperatorLineage(inputs=inputs, outputs=outputs, run_facets=run_facets)
    except Exception:
        log.warning("Could not build OpenLineage facets; the task is unaffected", exc_info=True)
        return None
