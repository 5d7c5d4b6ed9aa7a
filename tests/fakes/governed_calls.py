"""record_governed_call: what the governed client records for one call, written through the real Governor,
BudgetLedger and AuditStore APIs, with a scripted latency and usage instead of a model and a clock.

A named fake of the model, for tests of what reads the trail (views, the UI API, the CLI): authorize (an
allow or a deny record), reserve the worst case, settle the real usage, and a ``model.call`` record; or a
``budget.deny`` when the reservation does not fit.
"""

from __future__ import annotations

from governed_ai.core.audit import AuditRecord
from governed_ai.core.governor import Governor
from governed_ai.core.ledger import BudgetExceeded
from governed_ai.core.pricing import PriceTable, estimate_prompt_tokens
from governed_ai.core.subject import Subject


def record_governed_call(
    governor: Governor,
    subject: Subject,
    model: str,
    *,
    latency_ms: float = 1.0,
    prompt_tokens: int = 40,
    completion_tokens: int = 9,
    max_tokens: int = 20,
    prices: PriceTable | None = None,
    connection_id: str = "llm",
) -> str:
    """Returns what happened: ``"ok"``, ``"denied"`` (model not granted) or ``"budget"`` (budget stop)."""
    prices = prices or PriceTable()
    resource = f"{connection_id}/{model}"
    decision = governor.engine().authorize_model(subject, connection_id, model)
    if not decision.allowed:
        governor.record(governor.denial_record(subject, decision, model=model))
        return "denied"
    governor.record(governor.allow_record(subject, decision, model=model))
    estimate = estimate_prompt_tokens(len("hi")) + max_tokens
    try:
        reservation = governor.ledger.reserve(
            governor.budget_keys(subject),
            tokens=estimate,
            cost_usd=prices.cost(model, estimate, 0),
            holder=governor.holder(subject),
            ttl_seconds=600,
        )
    except BudgetExceeded as exceeded:
        governor.record(
            AuditRecord.for_subject(
                subject,
                action="budget.deny",
                resource=resource,
                decision="deny",
                rule=exceeded.budget,
                model=model,
                outcome="denied",
                error=str(exceeded),
            )
        )
        return "budget"
    cost = prices.cost(model, prompt_tokens, completion_tokens)
    governor.ledger.settle(reservation.id, tokens=prompt_tokens + completion_tokens, cost_usd=cost)
    governor.record(
        AuditRecord.for_subject(
            subject,
            action="model.call",
            resource=resource,
            decision="allow",
            rule=decision.rule,
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            latency_ms=latency_ms,
        )
    )
    return "ok"
