"""OpenTelemetry spans for model calls, tool calls and retrievals, following the GenAI conventions.

Spans are made from audit records once they are stored, with the start and end times the records carry
(end = the record's time, start = end - latency), as children of whatever span is current: the task's
span when Airflow's tracing is on. With no tracer provider configured the OpenTelemetry API is a no-op,
so this costs nothing by default. Message content is attached only when the record carries it, which
the policy allows with ``store_content`` and which is already redacted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from governed_ai.core.audit import AuditRecord

_SPANNED = {"model.call": "chat", "tool.call": "execute_tool", "collection.query": "retrieval"}


class SpanObserver:
    """Emits one span per model call, tool call and retrieval record."""

    def __init__(self, tracer_provider: Any | None = None) -> None:
        from opentelemetry import trace

        self._tracer = trace.get_tracer("governed_ai", tracer_provider=tracer_provider)

    def __call__(self, records: Sequence[AuditRecord]) -> None:
        for record in records:
            operation = _SPANNED.get(record.action)
            if operation is not None and record.decision != "deny":
                self._span(operation, record)

    def _span(self, operation: str, r: AuditRecord) -> None:
        from opentelemetry.trace import Status, StatusCode

        end_ns = int(r.time.timestamp() * 1e9)
        start_ns = end_ns - int((r.latency_ms or 0.0) * 1e6)
        target = r.model if operation == "chat" else r.resource
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "airflow.dag_id": r.dag_id or "",
            "airflow.task_id": r.task_id or "",
            "airflow.run_id": r.run_id or "",
            "governed_ai.rule": r.rule or "",
            "governed_ai.outcome": r.outcome,
        }
        if operation == "chat":
            attributes.update(
                {
                    "gen_ai.request.model": r.model or "",
                    "gen_ai.usage.input_tokens": r.prompt_tokens or 0,
                    "gen_ai.usage.output_tokens": r.completion_tokens or 0,
                    "governed_ai.cost_usd": r.cost_usd or 0.0,
                }
            )
            if r.prompt_version:
                attributes["gen_ai.prompt.name"] = r.prompt_version
        elif operation == "execute_tool":
            attributes["gen_ai.tool.name"] = r.resource or ""
        else:
            attributes["gen_ai.data_source.id"] = r.resource or ""
            retrieved = r.extra.get("retrieved") or []
            attributes["governed_ai.retrieved_ids"] = [
                str(x.get("id")) for x in retrieved if isinstance(x, dict)
            ]
        if r.content:
            attributes["governed_ai.content"] = r.content  # present only if the policy stores it, redacted
        span = self._tracer.start_span(
            f"{operation} {target}".strip(), start_time=start_ns, attributes=attributes
        )
        if r.outcome not in ("ok", "replayed"):
            span.set_status(Status(StatusCode.ERROR, (r.error or r.outcome)[:200]))
            if r.error:
                span.set_attribute("error.type", r.error.split(":", 1)[0][:100])
        span.end(end_time=end_ns)
