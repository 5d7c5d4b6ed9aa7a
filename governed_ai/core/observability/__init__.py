"""Observability (Airflow-free): metrics and trace spans derived from audit records, lineage facets.

Every governed action already produces an audit record with its identity, model, tokens, cost, latency,
decision and outcome. Observers turn those records into metrics and spans after they are stored, so the
figures in a dashboard and in the audit trail can never disagree, and no operator has to remember to
emit them. Observers never fail the task: an error there is logged and dropped.
"""

from governed_ai.core.observability.metrics import MetricsObserver, MetricsSink
from governed_ai.core.observability.tracing import SpanObserver

__all__ = ["MetricsObserver", "MetricsSink", "SpanObserver"]
