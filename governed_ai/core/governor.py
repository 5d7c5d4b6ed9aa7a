"""The governance state of a deployment in one object: the current policy, the budget ledger, the audit
trail, redaction, and the digest that keeps keys out of the store.

A :class:`Governor` holds no Airflow objects, so every rule is testable as plain Python. It answers and
records *decisions*; calls to models go through :class:`~governed_ai.core.client.GovernedClient`, tool
calls through :class:`~governed_ai.core.tools.runner.GovernedToolRunner`, retrieval through
:class:`~governed_ai.core.retrieval.governed.GovernedRetrieval`, all of which use this object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from governed_ai.core.audit import AuditRecord, AuditStore, canonical_json
from governed_ai.core.errors import GovernanceDenied
from governed_ai.core.journal import sha256_digest
from governed_ai.core.ledger import BudgetKey, BudgetLedger
from governed_ai.core.policy import Decision, PolicyEngine
from governed_ai.core.policy import RedactionSettings as PolicyRedaction
from governed_ai.core.redaction import RedactionSettings, Redactor, report_secrets
from governed_ai.core.sqlstore import utc_now
from governed_ai.core.subject import Subject


class EngineSource(Protocol):
    """Anything that hands out the current policy engine (a hot-reloading :class:`PolicyProvider`)."""

    def engine(self) -> PolicyEngine: ...


@dataclass(frozen=True)
class FixedPolicy:
    """An engine that never changes, e.g. the deny-all engine used when no policy is configured."""

    fixed: PolicyEngine

    def engine(self) -> PolicyEngine:
        return self.fixed


@dataclass
class Governor:
    """Policy, budget ledger, audit store and redaction, applied together.

    ``mask`` is an extra masking pass applied after the redactor (the governance hook passes Airflow's
    own secrets masker, which knows every connection password and sensitive variable of the task).
    ``digest`` turns key material (task instance, item keys, request bodies) into what the journal and the
    audit trail store: the deployment's keyed digest when one is configured.
    ``on_secret_found`` is called with each secret value the redactor finds (the governance hook registers
    them with Airflow's masker, so task logs and rendered fields hide them too).
    """

    policy: EngineSource
    ledger: BudgetLedger
    audit: AuditStore
    mask: Callable[[str], str] = field(default=lambda text: text)
    digest: Callable[[str], str] = sha256_digest
    on_secret_found: Callable[[str], None] | None = None
    clock: Callable[[], datetime] = utc_now
    _redactors: dict[tuple[Any, ...], Redactor] = field(default_factory=dict, init=False, repr=False)

    def engine(self) -> PolicyEngine:
        return self.policy.engine()

    # -- redaction ---------------------------------------------------------------------------------------

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

    # -- decisions and records ---------------------------------------------------------------------------

    def record(self, record: AuditRecord) -> None:
        self.audit.append(record)

    def denial_record(self, subject: Subject, decision: Decision, **audit_fields: Any) -> AuditRecord:
        """The audit record of a denial, its reason redacted (it may quote an argument or a card number)."""
        reason, _ = self.redact_text(decision.reason, decision.redaction)
        return AuditRecord.for_subject(
            subject,
            action=f"{decision.action}.authorize",
            resource=decision.resource,
            decision="deny",
            rule=decision.rule,
            outcome="denied",
            error=reason,
            extra={"policy_digest": decision.policy_digest[:16]},
            **audit_fields,
        )

    def allow_record(self, subject: Subject, decision: Decision, **audit_fields: Any) -> AuditRecord:
        return AuditRecord.for_subject(
            subject,
            action=f"{decision.action}.authorize",
            resource=decision.resource,
            decision="allow",
            rule=decision.rule,
            outcome="ok",
            extra={"policy_digest": decision.policy_digest[:16]},
            **audit_fields,
        )

    def enforce(self, subject: Subject, decision: Decision, **audit_fields: Any) -> Decision:
        """Audit a decision; raise :class:`GovernanceDenied` if it is a denial."""
        if decision.allowed:
            self.record(self.allow_record(subject, decision, **audit_fields))
            return decision
        record = self.denial_record(subject, decision, **audit_fields)
        self.record(record)
        raise GovernanceDenied(
            record.error or "denied", action=decision.action, resource=decision.resource, rule=decision.rule
        )

    # -- budgets -----------------------------------------------------------------------------------------

    def budget_keys(self, subject: Subject) -> list[BudgetKey]:
        """The budget windows that apply to ``subject`` now, as the current policy defines them."""
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

    @staticmethod
    def holder(subject: Subject) -> str:
        """Who holds a reservation, as ``budget status`` shows it: the task instance and its try."""
        return (
            f"{subject.dag_id}/{subject.run_id}/{subject.task_id}/{subject.map_index}/try{subject.try_number}"
        )

    def instance_digest(self, subject: Subject) -> str:
        """The digest of the task instance (not the try): every try of it shares its journal steps."""
        return self.digest(
            canonical_json(["ti", subject.dag_id, subject.run_id, subject.task_id, subject.map_index])
        )


def _mask_obj(obj: Any, mask: Callable[[str], str]) -> Any:
    if isinstance(obj, str):
        return mask(obj)
    if isinstance(obj, dict):
        return {key: _mask_obj(value, mask) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_mask_obj(value, mask) for value in obj)
    return obj
