"""The one XCom contract of the AI operators, and the one manifest shape of results written to files.

Every AI operator's XCom value carries the same core: ``model``, ``usage`` (``prompt_tokens``,
``completion_tokens``, ``total_tokens``), ``cost_usd``, ``latency_ms`` and ``governance`` (``rule``,
``prompt_version``, ``redactions``, ``fallbacks_tried``, and ``cache`` when the policy caches the request),
next to what is specific to the operator (the
reply, the agent's answer, a batch's rows or manifest). Results too many for XCom go to a JSON Lines file and
XCom carries a manifest: ``{"manifest": "governed_ai.rows/v1", "results_path", "failures_path", "rows",
"failed_rows"}``, which the quality gate reads from local paths and object storage alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MANIFEST_KIND = "governed_ai.rows/v1"


def usage_xcom(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
        "total_tokens": int(prompt_tokens) + int(completion_tokens),
    }


def governance_xcom(
    *,
    rule: str | None,
    prompt_version: str | None,
    redactions: int,
    fallbacks_tried: Sequence[str] = (),
    cache: str | None = None,
) -> dict[str, Any]:
    """``cache`` (only present when the policy caches the request): ``hit``, ``miss``, or for a batch
    ``partial`` (some items answered by the response cache)."""
    governance: dict[str, Any] = {
        "rule": rule,
        "prompt_version": prompt_version,
        "redactions": int(redactions),
        "fallbacks_tried": list(fallbacks_tried),
    }
    if cache is not None:
        governance["cache"] = cache
    return governance


def ai_xcom(
    *,
    model: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    cost_usd: float,
    latency_ms: float | None,
    governance: Mapping[str, Any],
    **specific: Any,
) -> dict[str, Any]:
    """The common core of every AI operator's XCom value, plus the operator's own fields."""
    return {
        **specific,
        "model": model,
        "usage": usage_xcom(prompt_tokens, completion_tokens),
        "cost_usd": round(float(cost_usd), 10),
        "latency_ms": None if latency_ms is None else round(float(latency_ms), 3),
        "governance": dict(governance),
    }


def rows_manifest(
    results_path: str, failures_path: str | None, *, rows: int, failed_rows: int = 0
) -> dict[str, Any]:
    """What XCom carries instead of rows written to a file (local path or object-storage URI)."""
    return {
        "manifest": MANIFEST_KIND,
        "results_path": results_path,
        "failures_path": failures_path,
        "rows": int(rows),
        "failed_rows": int(failed_rows),
    }


def is_rows_manifest(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("manifest") == MANIFEST_KIND
