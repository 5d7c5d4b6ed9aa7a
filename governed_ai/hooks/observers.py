"""Airflow's side of observability: metrics through Airflow's own ``Stats`` and spans via OpenTelemetry."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

from governed_ai.core.audit import AuditObserver
from governed_ai.core.observability import MetricsObserver, SpanObserver


class AirflowStatsSink:
    """Sends to whatever ``[metrics]`` configures: StatsD, Datadog or OpenTelemetry metrics (or nothing)."""

    def incr(self, stat: str, count: int = 1, *, tags: dict[str, Any] | None = None) -> None:
        _stats().incr(stat, count, tags=_str_tags(tags))

    def timing(self, stat: str, ms: float, *, tags: dict[str, Any] | None = None) -> None:
        _stats().timing(stat, timedelta(milliseconds=ms), tags=_str_tags(tags))


@functools.cache
def _stats() -> Any:
    """Airflow's ``Stats``, looked up once (through common-compat's lazy import, which costs a few
    microseconds per access on every metric otherwise)."""
    from airflow.providers.common.compat.sdk import Stats

    return Stats


def _str_tags(tags: dict[str, Any] | None) -> dict[str, str] | None:
    return {key: str(value) for key, value in tags.items()} if tags else None


def default_observers() -> list[AuditObserver]:
    """Metrics and spans for every audit record a worker stores."""
    return [MetricsObserver(AirflowStatsSink()), SpanObserver()]
