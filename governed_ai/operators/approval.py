"""Approval by policy in the operators: a policy's ``require_approval`` becomes an Airflow human-in-the-loop
request, and the task waits for the answer holding no worker slot.

The core raises :class:`~governed_ai.core.errors.ApprovalRequired` before anything is reserved, paid or
run (:mod:`governed_ai.core.approval`). An operator that mixes in :class:`ApprovalByPolicy` and runs its
work through :meth:`ApprovalByPolicy.with_approval` then:

1. writes the request the way Airflow's own ``HITLOperator`` does (the HITL detail of this task instance:
   options *Approve* / *Reject*, the policy's approvers as the assigned users, a subject and a body that
   name the action, the resource, the rule and the estimated cost, never a prompt);
2. waits as Airflow's own ``HITLOperator`` does on the running line, with the policy's timeout: on Airflow
   3.3+ parked in the ``awaiting_input`` state (no trigger; the REST answer or the scheduler's timeout sweep
   resumes it), on 3.1 and 3.2 deferred to ``HITLTrigger`` in the triggerer;
3. on resume (:meth:`ApprovalByPolicy.resume_after_approval`) audits the answer with the approver
   (``approval.granted`` / ``approval.rejected``) and, when approved, runs ``execute`` again: the approval
   is found in the audit trail and the replay journal makes the re-run pay nothing twice. A rejection, a
   timeout or an answer from someone the policy does not name fails the task without retries.

Needs Airflow 3.1+ (human-in-the-loop); Airflow's names are imported where they are used, and arguments a
line does not know yet (e.g. assigned users) are left out, so the operators import on every line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.providers.common.compat.sdk import AirflowFailException

from governed_ai.core.approval import (
    APPROVAL_REJECTED,
    APPROVAL_REQUESTED,
    RESUMED_AFTER_APPROVAL,
    Answer,
    ApprovalGate,
    describe,
    record_answer,
)
from governed_ai.core.audit import AuditRecord
from governed_ai.core.errors import ApprovalRequired
from governed_ai.hooks.governance import GovernanceHook

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

T = TypeVar("T")

APPROVE = "Approve"
REJECT = "Reject"
#: The operator method Airflow calls when the human-in-the-loop trigger fires.
RESUME_METHOD = "resume_after_approval"
# How often the trigger (3.1/3.2) looks for an answer: Airflow's default (approvals take minutes, not ms).
_POKE_INTERVAL_SECONDS = 5.0


def _supported(function: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` without those ``function`` does not take (older Airflow lines lack some)."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return arguments
    return {name: value for name, value in arguments.items() if name in parameters}


def _task_awaiting_input() -> Callable[..., BaseException] | None:
    """Airflow 3.3+'s signal that parks a task until a human answers; None on older lines (they defer)."""
    try:
        from airflow.sdk.exceptions import TaskAwaitingInput
    except ImportError:
        return None
    return TaskAwaitingInput


def approval_request_text(needed: ApprovalRequired, context: Context) -> tuple[str, str]:
    """The subject and body an approver reads: what, for which task, under which rule, at what cost.

    Only names and numbers: never a prompt, a tool argument or a document.
    """
    ti = context["ti"]
    what = describe(needed.action, needed.resource)
    subject = f"Approve {what} for {ti.dag_id}.{ti.task_id}?"
    lines = [
        f"The governance policy (rule `{needed.rule}`) requires a human to approve **{what}** "
        "before it runs.",
        "",
        f"- DAG: `{ti.dag_id}`, task: `{ti.task_id}`, run: `{ti.run_id}`"
        + (f", map index {ti.map_index}" if getattr(ti, "map_index", -1) not in (None, -1) else ""),
        f"- Approvers: {', '.join(needed.approvers)}",
        f"- Answer within {needed.timeout_minutes} minutes; no answer is a rejection.",
    ]
    if needed.estimated_cost_usd is not None:
        lines.append(f"- Estimated worst-case cost: ${needed.estimated_cost_usd:.4f}")
    elif needed.action == "model":
        lines.append("- Estimated cost: unknown (the model has no price on its connection)")
    lines += ["", "Nothing has been reserved, paid or run yet. Rejecting fails the task without retries."]
    return subject, "\n".join(lines)


class ApprovalByPolicy:
    """Mix into a governed operator (before ``BaseOperator``) that has a ``governance`` attribute (its
    :class:`GovernanceHook`); run the work with ``self.with_approval(context, work)``."""

    def with_approval(self, context: Context, work: Callable[[], T]) -> T:
        """Run ``work``; when the policy wants an approval first, ask for it and defer."""
        try:
            return work()
        except ApprovalRequired as needed:
            self.ask_for_approval(context, needed)
        except AirflowFailException as failed:
            # airflow_errors() turns every permanent error into a failure; this one is a question instead.
            if isinstance(failed.__cause__, ApprovalRequired):
                self.ask_for_approval(context, failed.__cause__)
            raise
        raise AssertionError("unreachable: asking for approval defers the task")  # pragma: no cover

    def ask_for_approval(self, context: Context, needed: ApprovalRequired) -> None:
        """Write the human-in-the-loop request for this task instance and defer until it is answered."""
        from airflow.providers.standard.triggers.hitl import HITLTrigger
        from airflow.sdk.execution_time.hitl import upsert_hitl_detail

        ti = context["ti"]
        self._refuse_a_second_request(context, needed)
        subject, body = approval_request_text(needed, context)
        upsert_hitl_detail(
            **_supported(
                upsert_hitl_detail,
                {
                    "ti_id": ti.id,
                    "options": [APPROVE, REJECT],
                    "subject": subject,
                    "body": body,
                    "defaults": None,  # no default: a timeout is an error event, i.e. a rejection
                    "multiple": False,
                    "params": {},
                    "assigned_users": [{"id": user, "name": user} for user in needed.approvers],
                },
            )
        )
        timeout = timedelta(minutes=needed.timeout_minutes)
        timeout_at = datetime.now(UTC) + timeout
        getattr(self, "log").info(  # noqa: B009  # the operator's logger
            "waiting for %s to approve %s (policy rule %r) until %s",
            ", ".join(needed.approvers), describe(needed.action, needed.resource), needed.rule,
            timeout_at.isoformat(timespec="seconds"),
        )  # fmt: skip
        resume_kwargs = {
            "approval": {
                "action": needed.action,
                "resource": needed.resource,
                "rule": needed.rule,
                "approvers": list(needed.approvers),
                "estimated_cost_usd": needed.estimated_cost_usd,
            }
        }
        awaiting_input = _task_awaiting_input()
        if awaiting_input is not None:
            # Airflow 3.3+, as its own HITLOperator does: the task is parked in `awaiting_input` (no worker
            # slot, no triggerer); the REST answer or the scheduler's timeout sweep resumes it.
            raise awaiting_input(method_name=RESUME_METHOD, kwargs=resume_kwargs, timeout=timeout)
        trigger = HITLTrigger(
            **_supported(
                HITLTrigger.__init__,
                {
                    "ti_id": ti.id,
                    "options": [APPROVE, REJECT],
                    "params": {},
                    "defaults": None,
                    "multiple": False,
                    "timeout_datetime": timeout_at,
                    "poke_interval": _POKE_INTERVAL_SECONDS,
                },
            )
        )
        getattr(self, "defer")(trigger=trigger, method_name=RESUME_METHOD, kwargs=resume_kwargs)  # noqa: B009

    def _refuse_a_second_request(self, context: Context, needed: ApprovalRequired) -> None:
        """Airflow keeps one human-in-the-loop request per task instance: asking again for something else
        would show the approver the first request's text and assignees. Fail, audited, instead."""
        hook: GovernanceHook = getattr(self, "governance")  # noqa: B009  # the operator's own hook
        subject = GovernanceHook.subject_from_context(context)
        gate = ApprovalGate(hook.governor, subject)
        others = gate.recorded(APPROVAL_REQUESTED) - {(needed.action, needed.resource)}
        if not others:
            return
        first = ", ".join(sorted(describe(action, resource) for action, resource in others))
        message = (
            f"{describe(needed.action, needed.resource)} needs an approval, but this task instance already "
            f"asked for one ({first}); Airflow keeps one human-in-the-loop request per task instance, so the "
            "approver would see the earlier request. Nothing was run. Put the actions that need different "
            "approvals in separate tasks."
        )
        hook.governor.record(
            AuditRecord.for_subject(
                subject, action=APPROVAL_REJECTED, resource=needed.resource, decision="deny",
                rule=needed.rule, outcome="second_request", error=message,
                extra={"for": needed.action, "approver": None},
            )
        )  # fmt: skip
        raise AirflowFailException(f"{context['ti'].task_id}: denied by governance: {message}")

    def resume_after_approval(
        self,
        context: Context,
        event: Mapping[str, Any] | None = None,
        approval: Mapping[str, Any] | None = None,
    ) -> Any:
        """Called by Airflow with the human's answer: audit it, then run again or fail without retries."""
        if approval is None:
            raise AirflowFailException("resumed without the approval request it answers; nothing was run")
        event = dict(event or {})
        answer, approver, why = _read_answer(event, context, approval)
        hook: GovernanceHook = getattr(self, "governance")  # noqa: B009  # the operator's own hook
        governor = hook.governor
        subject = GovernanceHook.subject_from_context(context)
        record = record_answer(
            governor,
            subject,
            action=str(approval["action"]),
            resource=str(approval["resource"]),
            rule=str(approval["rule"]),
            answer=answer,
            approver=approver,
            estimated_cost_usd=approval.get("estimated_cost_usd"),
        )
        what = describe(str(approval["action"]), str(approval["resource"]))
        if answer != "approved":
            ti = context["ti"]
            raise AirflowFailException(f"{ti.task_id}: denied by governance: {record.error}{why}")
        getattr(self, "log").info("%s approved by %s; running", what, approver)  # noqa: B009
        context[RESUMED_AFTER_APPROVAL] = True  # type: ignore[literal-required]  # replay what this try paid
        return getattr(self, "execute")(context)  # noqa: B009  # the whole execute, now approved


def _read_answer(
    event: Mapping[str, Any], context: Context, approval: Mapping[str, Any]
) -> tuple[Answer, str | None, str]:
    """The answer in a trigger event: (approved | rejected | timed_out, who answered, extra reason)."""
    if "error" in event:
        if event.get("error_type") == "timeout":
            return "timed_out", None, ""
        return "rejected", None, f" (the human-in-the-loop trigger failed: {event.get('error')})"
    if event.get("timedout"):
        return "timed_out", None, ""
    approver = _responder(event, context)
    chosen = list(event.get("chosen_options") or ())
    if chosen != [APPROVE]:
        return "rejected", approver, ""
    approvers = [str(a) for a in approval.get("approvers") or ()]
    if approver is None or approver not in approvers:
        # Airflow checks the assigned users on 3.2+; this holds on every line, and if the answer has no name.
        return (
            "rejected",
            approver,
            f" (answered by {approver or 'an unknown user'}, who is not one of the policy's approvers "
            f"{approvers})",
        )
    return "approved", approver, ""


def _responder(event: Mapping[str, Any], context: Context) -> str | None:
    """Who answered: from the event where Airflow puts it there, else from the stored response."""
    user = event.get("responded_by_user") or event.get("responded_by")
    if isinstance(user, Mapping):
        return str(user.get("name") or user.get("id") or "") or None
    if isinstance(user, str) and user:
        return user
    try:
        from airflow.sdk.execution_time.hitl import get_hitl_detail_content_detail

        detail = get_hitl_detail_content_detail(ti_id=context["ti"].id)
    except Exception:  # an older line without it: the caller treats an unknown responder as a rejection
        return None
    for name in ("responded_by_user", "responded_by", "user_id"):
        value = getattr(detail, name, None)
        if value is None:
            continue
        if isinstance(value, str):
            return value or None
        found = getattr(value, "name", None) or getattr(value, "id", None)
        if isinstance(value, Mapping):
            found = value.get("name") or value.get("id")
        if found:
            return str(found)
    return None
