"""The governance layer in one place: authorize, reserve budget, redact, call, settle, audit.

Every governed operator goes through a :class:`Governor`; it holds no Airflow objects, so each rule of
the flow is testable as plain Python. Denials are audited before they are raised.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from governed_ai.core.audit import AuditRecord, AuditStore
from governed_ai.core.chat import ChatRequest, ChatResult, Message
from governed_ai.core.ledger import BudgetExceeded, BudgetKey, BudgetLedger, Reservation
from governed_ai.core.policy import Decision, PolicyEngine
from governed_ai.core.policy import RedactionSettings as PolicyRedaction
from governed_ai.core.pricing import PriceTable, estimate_prompt_tokens
from governed_ai.core.redaction import RedactionSettings, Redactor, report_secrets
from governed_ai.core.sqlstore import utc_now
from governed_ai.core.structured_output import StructuredOutputError
from governed_ai.core.subject import Subject

# Reserve for this many completion tokens when a call sets no max_tokens: budgets need an upper bound.
DEFAULT_COMPLETION_RESERVE = 1024


class GovernanceDenied(PermissionError):
    """Policy or budget refused an action. Not retryable: retrying cannot change the answer."""

    def __init__(self, message: str, *, action: str, resource: str, rule: str | None = None) -> None:
        super().__init__(message)
        self.action = action
        self.resource = resource
        self.rule = rule


class ModelUnavailable(RuntimeError):
    """The endpoint failed for a model; the governor tries the policy's next fallback model."""


class EngineSource(Protocol):
    """Anything that hands out the current policy engine (a hot-reloading :class:`PolicyProvider`)."""

    def engine(self) -> PolicyEngine: ...


@dataclass(frozen=True)
class FixedPolicy:
    """An engine that never changes, e.g. the deny-all engine used when no policy is configured."""

    fixed: PolicyEngine

    def engine(self) -> PolicyEngine:
        return self.fixed


@dataclass(frozen=True)
class GovernedChatResult:
    """A model call's result plus what governance decided about it."""

    result: ChatResult
    rule: str | None
    prompt_version: str | None
    redactions: int
    fallbacks_tried: tuple[str, ...] = ()

    def to_xcom(self) -> dict[str, Any]:
        data = self.result.to_xcom()
        data["governance"] = {
            "rule": self.rule,
            "prompt_version": self.prompt_version,
            "redactions": self.redactions,
            "fallbacks_tried": list(self.fallbacks_tried),
        }
        return data


@dataclass
class Governor:
    """Policy, budget ledger, audit store and redaction, applied together.

    ``mask`` is an extra masking pass applied after the redactor (the governance hook passes Airflow's
    own secrets masker, which knows every connection password and sensitive variable of the task).
    ``on_secret_found`` is called with each secret value the redactor finds (the governance hook registers
    them with Airflow's masker, so task logs and rendered fields hide them too).
    """

    policy: EngineSource
    ledger: BudgetLedger
    audit: AuditStore
    mask: Callable[[str], str] = field(default=lambda text: text)
    on_secret_found: Callable[[str], None] | None = None
    clock: Callable[[], datetime] = utc_now
    _redactors: dict[tuple[Any, ...], Redactor] = field(default_factory=dict, init=False, repr=False)

    def engine(self) -> PolicyEngine:
        return self.policy.engine()

    # -- building blocks ---------------------------------------------------------------------------

    def redactor_for(self, settings: PolicyRedaction) -> Redactor:
        key = tuple((p.name, p.regex) for p in settings.custom_patterns)
        if key not in self._redactors:
            patterns = tuple((p.name, p.compiled) for p in settings.custom_patterns)
            self._redactors[key] = Redactor(RedactionSettings(custom_patterns=patterns))
        return self._redactors[key]

    def redact_text(self, text: str, settings: PolicyRedaction) -> tuple[str, int]:
        result = self.redactor_for(settings).redact(text)
        if self.on_secret_found is not None:
            report_secrets(text, result, self.on_secret_found)
        return self.mask(result.text), len(result.findings)

    def redact_obj(self, obj: Any, settings: PolicyRedaction) -> tuple[Any, int]:
        detailed = self.redactor_for(settings).redact_obj_detailed(obj, on_secret=self.on_secret_found)
        return _mask_obj(detailed.value, self.mask), len(detailed.findings)

    def record(self, record: AuditRecord) -> None:
        self.audit.append(record)

    def enforce(self, subject: Subject, decision: Decision, **audit_fields: Any) -> Decision:
        """Audit a decision; raise :class:`GovernanceDenied` if it is a denial."""
        reason = decision.reason
        if not decision.allowed:
            # A denial's reason may quote the offending value (a tool argument, a card number): redact it
            # before it reaches the audit trail, the exception and the task log.
            reason, _ = self.redact_text(reason, decision.redaction)
        self.record(
            AuditRecord.for_subject(
                subject,
                action=f"{decision.action}.authorize",
                resource=decision.resource,
                decision="allow" if decision.allowed else "deny",
                rule=decision.rule,
                outcome="ok" if decision.allowed else "denied",
                error=None if decision.allowed else reason,
                extra={"policy_digest": decision.policy_digest[:16]},
                **audit_fields,
            )
        )
        if not decision.allowed:
            raise GovernanceDenied(reason, action=decision.action, resource=decision.resource)
        return decision

    def budget_keys(self, subject: Subject) -> list[BudgetKey]:
        return [
            BudgetKey(
                budget=b.name,
                period=b.period_key,
                max_tokens=b.max_tokens,
                max_cost_usd=b.max_cost_usd,
                resets_at=b.resets_at,
                period_kind=b.period,
            )
            for b in self.engine().budgets_for(subject, self.clock())
        ]

    def reserve(
        self, subject: Subject, *, tokens: int, cost_usd: float, resource: str, model: str | None = None
    ) -> Reservation | None:
        """Hold budget for a call, or audit and raise the budget denial. None when no budget applies."""
        keys = self.budget_keys(subject)
        if not keys:
            return None
        try:
            return self.ledger.reserve(
                keys,
                tokens=tokens,
                cost_usd=cost_usd,
                holder=_holder(subject),
                ttl_seconds=self.engine().defaults.reservation_ttl_seconds,
            )
        except BudgetExceeded as exceeded:
            self.record(
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
            raise GovernanceDenied(
                f"Budget exhausted: {exceeded}. "
                "Raise the budget's limit in the policy or wait until it resets.",
                action="budget",
                resource=resource,
                rule=exceeded.budget,
            ) from None

    # -- a whole model call --------------------------------------------------------------------------

    def chat(
        self,
        subject: Subject,
        *,
        connection_id: str,
        requested_model: str,
        request: ChatRequest,
        call: Callable[[ChatRequest], ChatResult],
        prices: PriceTable,
        prompt_version: str | None = None,
    ) -> GovernedChatResult:
        """Authorize (with model routing and fallbacks), reserve, redact, call, settle and audit."""
        engine = self.engine()
        candidates = engine.resolve_model(subject, connection_id, requested_model)
        if not candidates:
            self.enforce(
                subject,
                engine.authorize_model(subject, connection_id, requested_model),
                model=requested_model,
            )
            raise AssertionError("unreachable: an empty route is always a denial")  # pragma: no cover
        tried: list[str] = []
        for model in candidates:
            decision = self.enforce(
                subject,
                engine.authorize_model(subject, connection_id, model),
                model=model,
                prompt_version=prompt_version,
            )
            try:
                result, redactions = self._call_one(
                    subject, decision, model, request, call, prices, connection_id, prompt_version
                )
            except ModelUnavailable:
                tried.append(model)
                if len(tried) == len(candidates):
                    raise
                continue
            return GovernedChatResult(
                result=result,
                rule=decision.rule,
                prompt_version=prompt_version,
                redactions=redactions,
                fallbacks_tried=tuple(tried),
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def _call_one(
        self,
        subject: Subject,
        decision: Decision,
        model: str,
        request: ChatRequest,
        call: Callable[[ChatRequest], ChatResult],
        prices: PriceTable,
        connection_id: str,
        prompt_version: str | None,
    ) -> tuple[ChatResult, int]:
        redaction = decision.redaction
        max_tokens = request.max_tokens
        if decision.max_tokens_per_call is not None:
            max_tokens = min(max_tokens or decision.max_tokens_per_call, decision.max_tokens_per_call)
        messages: Sequence[Message] = request.messages
        redactions = 0
        if redaction.prompts:
            messages, redactions = self.redact_obj(list(messages), redaction)
        governed = request.model_copy(update={"model": model, "max_tokens": max_tokens, "messages": messages})

        prompt_chars = sum(len(str(m.get("content") or "")) for m in messages)
        attempts = 1 + (request.max_repair_attempts if request.output_schema is not None else 0)
        est_prompt = estimate_prompt_tokens(prompt_chars) * attempts
        est_completion = (max_tokens or DEFAULT_COMPLETION_RESERVE) * attempts
        resource = f"{connection_id}/{model}"
        reservation = self.reserve(
            subject,
            tokens=est_prompt + est_completion,
            cost_usd=prices.cost(model, est_prompt, est_completion),
            resource=resource,
            model=model,
        )
        started = time.perf_counter()
        try:
            result = call(governed)
        except StructuredOutputError as err:
            # The failed attempts were paid for: charge them, then fail.
            spent_cost = prices.cost(model, err.prompt_tokens, err.completion_tokens)
            self._settle(reservation, err.prompt_tokens + err.completion_tokens, spent_cost)
            self._audit_call(
                subject, decision, resource, model, prompt_version, started, err,
                prompt_tokens=err.prompt_tokens, completion_tokens=err.completion_tokens, cost_usd=spent_cost,
            )  # fmt: skip
            raise
        except Exception as err:
            if reservation is not None:
                self.ledger.release(reservation.id)
            self._audit_call(subject, decision, resource, model, prompt_version, started, err)
            raise
        self._settle(reservation, result.usage.total_tokens, result.cost_usd)
        if redaction.outputs:
            redacted, found = self.redact_obj({"content": result.content, "output": result.output}, redaction)
            redactions += found
            result = result.model_copy(update={"content": redacted["content"], "output": redacted["output"]})
        content = None
        if redaction.store_content:
            content = _content_for_audit(messages, result)
            if not (redaction.prompts and redaction.outputs):
                # What the audit trail keeps is always redacted, even the parts the model or XCom got raw;
                # parts already redacted above are not scanned a second time.
                content, _ = self.redact_text(content, redaction)
        self._audit_call(
            subject, decision, resource, model, prompt_version, started, None,
            prompt_tokens=result.usage.prompt_tokens, completion_tokens=result.usage.completion_tokens,
            cost_usd=result.cost_usd, latency_ms=result.latency_ms, content=content,
            extra={"attempts": result.attempts, "redactions": redactions},
        )  # fmt: skip
        return result, redactions

    def _settle(self, reservation: Reservation | None, tokens: int, cost_usd: float) -> None:
        if reservation is not None:
            self.ledger.settle(reservation.id, tokens=tokens, cost_usd=cost_usd)

    def _audit_call(
        self,
        subject: Subject,
        decision: Decision,
        resource: str,
        model: str,
        prompt_version: str | None,
        started: float,
        error: BaseException | None,
        **fields: Any,
    ) -> None:
        fields.setdefault("latency_ms", round((time.perf_counter() - started) * 1000, 3))
        message = None
        if error is not None:
            message, _ = self.redact_text(f"{type(error).__name__}: {error}"[:2000], decision.redaction)
        self.record(
            AuditRecord.for_subject(
                subject,
                action="model.call",
                resource=resource,
                decision="allow",
                rule=decision.rule,
                model=model,
                prompt_version=prompt_version,
                outcome="ok" if error is None else "error",
                error=message,
                **fields,
            )
        )


def _holder(subject: Subject) -> str:
    return f"{subject.dag_id}/{subject.run_id}/{subject.task_id}/{subject.map_index}/try{subject.try_number}"


def _content_for_audit(messages: Iterable[Message], result: ChatResult) -> str:
    prompt = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in messages)
    reply = result.content if result.output is None else str(result.output)
    return f"{prompt}\n[assistant] {reply}"[:20_000]


def _mask_obj(obj: Any, mask: Callable[[str], str]) -> Any:
    if isinstance(obj, str):
        return mask(obj)
    if isinstance(obj, dict):
        return {key: _mask_obj(value, mask) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_mask_obj(value, mask) for value in obj)
    return obj
