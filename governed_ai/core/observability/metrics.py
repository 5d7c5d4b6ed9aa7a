"""Counters and timers from audit records, through a sink (Airflow's ``Stats`` in a deployment).

Names (all with tags ``dag_id``, ``task_id`` and, where it applies, ``model``, ``tool``, ``collection``,
``outcome``, ``rule``):

- ``governed_ai.model.calls``, ``governed_ai.model.prompt_tokens``, ``governed_ai.model.completion_tokens``,
  ``governed_ai.model.cost_micro_usd`` (counters; cost in millionths of a dollar, counters are integers),
  ``governed_ai.model.latency`` (timer, ms);
- ``governed_ai.denials`` (policy or budget said no; tag ``action``);
- ``governed_ai.cache.hits`` (requests the response cache answered, nothing paid; tags ``model`` and
  ``kind``: chat or embed);
- ``governed_ai.tool.calls`` and ``governed_ai.tool.latency``; ``governed_ai.retrieval.queries``,
  ``governed_ai.retrieval.ingested_chunks``;
- ``governed_ai.validation.runs`` and ``governed_ai.validation.failed_rows``.

Tags reach StatsD only with a tag-aware backend (Datadog-style StatsD or OpenTelemetry metrics), as
Airflow configures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from governed_ai.core.audit import AuditRecord

PREFIX = "governed_ai"


class MetricsSink(Protocol):
    def incr(self, stat: str, count: int = 1, *, tags: dict[str, Any] | None = None) -> None: ...

    def timing(self, stat: str, ms: float, *, tags: dict[str, Any] | None = None) -> None: ...


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


class MetricsObserver:
    """Turns stored audit records into metrics on ``sink``."""

    def __init__(self, sink: MetricsSink) -> None:
        self.sink = sink

    def __call__(self, records: Sequence[AuditRecord]) -> None:
        for record in records:
            self._one(record)

    def _one(self, r: AuditRecord) -> None:
        tags: dict[str, Any] = {"dag_id": r.dag_id or "", "task_id": r.task_id or ""}
        if r.decision == "deny":
            self.sink.incr(f"{PREFIX}.denials", tags={**tags, "action": r.action, "rule": r.rule or ""})
            return
        if r.action == "model.call":
            t = {**tags, "model": r.model or "", "outcome": r.outcome}
            self.sink.incr(f"{PREFIX}.model.calls", tags=t)
            self.sink.incr(f"{PREFIX}.model.prompt_tokens", _int(r.prompt_tokens), tags=t)
            self.sink.incr(f"{PREFIX}.model.completion_tokens", _int(r.completion_tokens), tags=t)
            self.sink.incr(f"{PREFIX}.model.cost_micro_usd", round((r.cost_usd or 0.0) * 1_000_000), tags=t)
            if r.latency_ms is not None:
                self.sink.timing(f"{PREFIX}.model.latency", r.latency_ms, tags=t)
        elif r.action in ("model.cache_hit", "embedding.cache_hit"):
            kind = "chat" if r.action == "model.cache_hit" else "embed"
            self.sink.incr(f"{PREFIX}.cache.hits", tags={**tags, "model": r.model or "", "kind": kind})
        elif r.action == "tool.call":
            t = {**tags, "tool": r.resource or "", "outcome": r.outcome}
            self.sink.incr(f"{PREFIX}.tool.calls", tags=t)
            if r.latency_ms is not None:
                self.sink.timing(f"{PREFIX}.tool.latency", r.latency_ms, tags=t)
        elif r.action == "collection.query":
            t = {**tags, "collection": r.resource or ""}
            self.sink.incr(f"{PREFIX}.retrieval.queries", _int(r.extra.get("queries")) or 1, tags=t)
        elif r.action == "collection.ingest":
            t = {**tags, "collection": r.resource or ""}
            self.sink.incr(f"{PREFIX}.retrieval.ingested_chunks", _int(r.extra.get("new_chunks")), tags=t)
        elif r.action == "validation.run":
            t = {**tags, "suite": r.resource or "", "outcome": r.outcome}
            self.sink.incr(f"{PREFIX}.validation.runs", tags=t)
            failed = r.extra.get("failed_rows", r.extra.get("failed"))
            if failed:
                self.sink.incr(f"{PREFIX}.validation.failed_rows", _int(failed), tags=t)
