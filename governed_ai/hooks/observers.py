"""Airflow's side of observability: metrics through Airflow's own ``Stats`` and spans via OpenTelemetry."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from governed_ai.core.audit import AuditObserver
from governed_ai.core.observability import MetricsObserver, SpanObserver
from governed_ai.hooks.airflow_sdk import airflow_sdk


class AirflowStatsSink:
    """Sends to whatever ``[metrics]`` configures: StatsD, Datadog or OpenTelemetry metrics (or nothing)."""

    def incr(self, stat: str, count: int = 1, *, tags: dict[str, Any] | None = None) -> None:
        airflow_sdk("Stats").incr(stat, count, tags=_str_tags(tags))

    def timing(self, stat: str, ms: float, *, tags: dict[str, Any] | None = None) -> None:
        airflow_sdk("Stats").timing(stat, timedelta(milliseconds=ms), tags=_str_tags(tags))


def _str_tags(tags: dict[str, Any] | None) -> dict[str, str] | None:
    return {key: str(value) for key, value in tags.items()} if tags else None


def default_observers() -> list[AuditObserver]:
    """Metrics and spans for every audit record a worker stores."""
    return [MetricsObserver(AirflowStatsSink()), SpanObserver()]
