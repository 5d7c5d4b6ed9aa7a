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
        # A group commit hands in hundreds of records: counters with the same name and tags are summed and
        # sent once per group (a StatsD counter adds them up either way); timings go one by one.
        counters = _Summing()
        for record in records:
            self._one(record, counters)
        for (stat, tags), count in counters.counted.items():
            self.sink.incr(stat, count, tags=dict(tags))

    def _one(self, r: AuditRecord, counters: _Summing) -> None:
        tags: dict[str, Any] = {"dag_id": r.dag_id or "", "task_id": r.task_id or ""}
        if r.decision == "deny":
            counters.incr(f"{PREFIX}.denials", tags={**tags, "action": r.action, "rule": r.rule or ""})
            return
        if r.action == "model.call":
            t = {**tags, "model": r.model or "", "outcome": r.outcome}
            counters.incr(f"{PREFIX}.model.calls", tags=t)
            counters.incr(f"{PREFIX}.model.prompt_tokens", _int(r.prompt_tokens), tags=t)
            counters.incr(f"{PREFIX}.model.completion_tokens", _int(r.completion_tokens), tags=t)
            counters.incr(f"{PREFIX}.model.cost_micro_usd", round((r.cost_usd or 0.0) * 1_000_000), tags=t)
            if r.latency_ms is not None:
                self.sink.timing(f"{PREFIX}.model.latency", r.latency_ms, tags=t)
        elif r.action in ("model.cache_hit", "embedding.cache_hit"):
            kind = "chat" if r.action == "model.cache_hit" else "embed"
            counters.incr(f"{PREFIX}.cache.hits", tags={**tags, "model": r.model or "", "kind": kind})
        elif r.action == "tool.call":
            t = {**tags, "tool": r.resource or "", "outcome": r.outcome}
            counters.incr(f"{PREFIX}.tool.calls", tags=t)
            if r.latency_ms is not None:
                self.sink.timing(f"{PREFIX}.tool.latency", r.latency_ms, tags=t)
        elif r.action == "collection.query":
            t = {**tags, "collection": r.resource or ""}
            counters.incr(f"{PREFIX}.retrieval.queries", _int(r.extra.get("queries")) or 1, tags=t)
        elif r.action == "collection.ingest":
            t = {**tags, "collection": r.resource or ""}
            counters.incr(f"{PREFIX}.retrieval.ingested_chunks", _int(r.extra.get("new_chunks")), tags=t)
        elif r.action == "validation.run":
            t = {**tags, "suite": r.resource or "", "outcome": r.outcome}
            counters.incr(f"{PREFIX}.validation.runs", tags=t)
            failed = r.extra.get("failed_rows", r.extra.get("failed"))
            if failed:
                counters.incr(f"{PREFIX}.validation.failed_rows", _int(failed), tags=t)


class _Summing:
    """Collects counter increments by name and tags (see :meth:`MetricsObserver.__call__`)."""

    def __init__(self) -> None:
        self.counted: dict[tuple[str, tuple[tuple[str, Any], ...]], int] = {}

    def incr(self, stat: str, count: int = 1, *, tags: dict[str, Any] | None = None) -> None:
        key = (stat, tuple(sorted((tags or {}).items())))
        self.counted[key] = self.counted.get(key, 0) + count
