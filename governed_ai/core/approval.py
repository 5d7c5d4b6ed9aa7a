"""Approval by policy: the check before an action that a rule's ``require_approval`` names, and the records
of a human's answer.

The policy (``require_approval`` in a rule, see :mod:`governed_ai.core.policy.document`) says which
models, tools, collection writes or costly calls a human must approve. The place that decides an action
(the governed client for model calls, the tool runner, the retrieval layer's writes) asks an
:class:`ApprovalGate` right after the policy allowed it and before anything is reserved, paid or run. When
an approval is required and this task instance has none recorded for that resource, the gate audits an
``approval.requested`` record and raises :class:`~governed_ai.core.errors.ApprovalRequired`; the operator
turns that into an Airflow human-in-the-loop request and defers (:mod:`governed_ai.operators.approval`).

The answer is written to the audit trail (hash-chained, so it cannot be edited unnoticed):
``approval.granted`` (decision ``allow``) or ``approval.rejected`` (decision ``deny``; outcome
``rejected`` or ``timed_out``), with the approver. An approval holds for one resource of one task
instance (dag, run, task, map index) and every try of it: the resumed ``execute`` finds it, and the replay
journal makes that re-run pay nothing twice. A rejection holds as long: a later try of the task instance
(a retry, a clear) is denied without asking again; a new DAG run asks again. Airflow-free.
"""

from __future__ import annotations

from typing import Any, Literal

from governed_ai.core.audit import AuditRecord
from governed_ai.core.errors import ApprovalRequired, GovernanceDenied
from governed_ai.core.governor import Governor
from governed_ai.core.policy import ApprovalAction, ApprovalNeed
from governed_ai.core.subject import Subject

APPROVAL_REQUESTED = "approval.requested"
APPROVAL_GRANTED = "approval.granted"
APPROVAL_REJECTED = "approval.rejected"

Answer = Literal["approved", "rejected", "timed_out"]
#: Context key the operators set when a try resumes after an approval: its governed client then replays
#: what the same try completed before it waited (that part ran in a worker process that has ended).
RESUMED_AFTER_APPROVAL = "governed_ai_resumed_after_approval"


class ApprovalGate:
    """Asks the policy whether an action needs approval, and the audit trail whether it has one.

    One per task (``subject``); granted approvals are cached, so a batch asks the store once per resource.
    """

    def __init__(self, governor: Governor, subject: Subject) -> None:
        self.governor = governor
        self.subject = subject
        self._granted: set[tuple[str, str]] = set()

    def may_need(self, action: ApprovalAction) -> bool:
        """A cheap pre-check: does any rule matching this task require approval of some ``action``?"""
        return self.governor.engine().may_need_approval(self.subject, action)

    def check(
        self,
        action: ApprovalAction,
        name: str,
        *,
        resource: str | None = None,
        estimated_cost_usd: float | None = None,
    ) -> None:
        """Return when ``name`` (model, tool or collection) needs no approval or has one; else audit the
        request and raise :class:`ApprovalRequired`. ``resource`` is how the audit trail names it (default
        ``name``; the client uses ``connection/model``)."""
        need = self.governor.engine().approval_needed(
            self.subject, action, name, estimated_cost_usd=estimated_cost_usd
        )
        if need is None:
            return
        shown = resource or name
        if self.granted(action, shown):
            return
        if (action, shown) in self.recorded(APPROVAL_REJECTED):
            # "No" holds for the task instance: a retry (or a clear) must not ask until someone says yes.
            denial = (
                f"{describe(action, shown)} was rejected (or not approved in time) earlier in this task "
                f"instance (policy rule {need.rule!r}); nothing was reserved, paid or run. A new DAG run "
                "asks again."
            )
            self.governor.record(
                AuditRecord.for_subject(
                    self.subject, action=APPROVAL_REJECTED, resource=shown, decision="deny", rule=need.rule,
                    outcome="rejected_before", error=denial, extra={"for": action, "approver": None},
                )
            )  # fmt: skip
            raise GovernanceDenied(denial, action=f"{action}.approval", resource=shown, rule=need.rule)
        cost = "" if estimated_cost_usd is None else f", estimated at most ${estimated_cost_usd:.4f}"
        message = (
            f"{describe(action, shown)}{cost} needs a human's approval (policy rule {need.rule!r}; "
            "approvers: "
            f"{', '.join(need.approvers)}; answer within {need.timeout_minutes} min). Nothing was reserved, "
            "paid or run. The governed operators ask through Airflow's human-in-the-loop and wait deferred."
        )
        self.governor.record(
            AuditRecord.for_subject(
                self.subject,
                action=APPROVAL_REQUESTED,
                resource=shown,
                decision="n/a",
                rule=need.rule,
                outcome="pending",
                cost_usd=estimated_cost_usd,
                extra=_need_extra(need, action),
            )
        )
        raise ApprovalRequired(
            message,
            action=action,
            resource=shown,
            rule=need.rule,
            approvers=need.approvers,
            timeout_minutes=need.timeout_minutes,
            estimated_cost_usd=estimated_cost_usd,
        )

    def granted(self, action: str, resource: str) -> bool:
        """Whether the audit trail holds an approval of ``resource`` for this task instance."""
        if (action, resource) not in self._granted and (action, resource) in self.recorded(APPROVAL_GRANTED):
            self._granted.add((action, resource))
        return (action, resource) in self._granted

    def recorded(self, record_action: str) -> set[tuple[str, str]]:
        """``(action, resource)`` of this task instance's records of ``record_action`` (e.g. every
        ``approval.requested``)."""
        return {
            (str(record.extra.get("for")), record.resource or "")
            for record in self.governor.audit.query(
                dag_id=self.subject.dag_id,
                run_id=self.subject.run_id,
                task_id=self.subject.task_id,
                action=record_action,
                limit=None,
            )
            if record.map_index == self.subject.map_index
        }


def describe(action: str, resource: str) -> str:
    """What is to be approved, in words: ``model call to c/m``, ``tool refund_order``, ..."""
    what = {"model": "model call to", "tool": "tool", "collection.write": "write to collection"}
    return f"{what.get(action, action)} {resource!r}"


def record_answer(
    governor: Governor,
    subject: Subject,
    *,
    action: str,
    resource: str,
    rule: str,
    answer: Answer,
    approver: str | None,
    estimated_cost_usd: float | None = None,
) -> AuditRecord:
    """Audit a human's answer (or the timeout) to an approval request, and return the record."""
    granted = answer == "approved"
    record = AuditRecord.for_subject(
        subject,
        action=APPROVAL_GRANTED if granted else APPROVAL_REJECTED,
        resource=resource,
        decision="allow" if granted else "deny",
        rule=rule,
        outcome=answer,
        cost_usd=estimated_cost_usd,
        error=None if granted else _refusal(action, resource, answer, approver),
        extra={"for": action, "approver": approver},
    )
    governor.record(record)
    return record


def _refusal(action: str, resource: str, answer: Answer, approver: str | None) -> str:
    if answer == "timed_out":
        return f"{describe(action, resource)} was not approved in time (no answer before the timeout)"
    return f"{describe(action, resource)} was rejected by {approver or 'an approver'}"


def _need_extra(need: ApprovalNeed, action: str) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "for": action,
        "approvers": list(need.approvers),
        "timeout_minutes": need.timeout_minutes,
    }
    if need.cost_threshold_usd is not None:
        extra["cost_threshold_usd"] = need.cost_threshold_usd
    return extra
