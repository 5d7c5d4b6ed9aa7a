"""Operator for one governed tool call: templated arguments, validated, authorized, journaled, audited."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException, BaseOperator

from governed_ai.core.journal import ReplayJournal
from governed_ai.core.tools import (
    TOOL_JOURNAL_SCOPE,
    GovernedToolRunner,
    Tool,
    ToolRegistry,
    default_registry,
)
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.approval import ApprovalByPolicy
from governed_ai.operators.errors import airflow_errors
from governed_ai.operators.lineage import operator_lineage
from governed_ai.plugins.links import AuditRecordsLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

# The step part of the idempotency key of a ToolOperator's single call.
TOOL_OPERATOR_STEP = "tool-operator"


def replay_journal(governance: GovernanceHook, scope: str = TOOL_JOURNAL_SCOPE) -> ReplayJournal:
    """The replay journal in the governance store the hook's governor writes its audit trail to."""
    governor = governance.governor
    return ReplayJournal(governor.audit.engine, scope, digest=governor.digest)


def resolve_tools(
    task_id: str, tools: Sequence[str | Tool], registry: ToolRegistry | None, parameter: str = "tools"
) -> list[Tool]:
    """Tools given by name (looked up in ``registry``) or as :class:`Tool` objects; errors name the task."""
    source = registry if registry is not None else default_registry
    resolved: list[Tool] = []
    for item in tools:
        if isinstance(item, Tool):
            resolved.append(item)
        elif isinstance(item, str):
            try:
                resolved.append(source.get(item))
            except KeyError as error:
                raise ValueError(f"{task_id}: '{parameter}': {error}") from None
        else:
            raise TypeError(
                f"{task_id}: '{parameter}' entries must be tool names or Tool objects, got "
                f"{type(item).__name__}: {item!r}"
            )
    names = [t.name for t in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{task_id}: '{parameter}' lists {duplicates} more than once")
    return resolved


class ToolOperator(ApprovalByPolicy, BaseOperator):
    """Run one named tool with templated arguments, under governance, and push its result to XCom.

    The arguments are rendered, validated against the tool's pydantic model (readable errors), and the
    policy must grant the tool to this task with these arguments (argument constraints apply). A tool with
    side effects is journaled under an idempotency key (dag, run, task, map index, tool, argument hash): when
    Airflow retries the task after the call completed, the result is replayed from the journal instead of
    repeating the effect; a call an earlier try started but never finished is not repeated unless the tool
    is idempotent (the task fails, asking a human to check). Every decision and call is audited. When a
    policy rule's ``require_approval`` names the tool, the task first waits for an approver through Airflow's
    human-in-the-loop (see :mod:`governed_ai.operators.approval`); a rejection fails it without retries.

    A denial, invalid arguments or an in-doubt call fail the task without retries
    (``AirflowFailException``): retrying cannot change them. An exception raised by the tool fails the
    task normally, so the task's retries apply.

    XCom: ``{"tool", "result", "replayed", "rule", "idempotency_key_sha256", "duration_ms", "redactions"}``;
    the result is redacted when the policy redacts outputs.

    :param tool: The tool: its registered name, or a :class:`~governed_ai.core.tools.Tool`.
    :param arguments: The arguments as a dict (keys are the tool's parameters). Templated; rendered strings
        are converted to the declared types (e.g. ``"5"`` to 5) by validation.
    :param registry: Where a tool name is looked up; default the process registry that ``@tool`` fills.
    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional; default
        ``governed_ai_governance_default``). Only connections the deployment lists in ``[governed_ai]
        allowed_governance_conn_ids`` may be named; any other fails the task before any call.
    """

    operator_extra_links = (AuditRecordsLink(),)

    template_fields: Sequence[str] = ("arguments",)
    template_fields_renderers = {"arguments": "json"}
    ui_color = "#fef3e8"

    def __init__(
        self,
        *,
        tool: str | Tool,
        arguments: dict[str, Any] | None = None,
        registry: ToolRegistry | None = None,
        governance_conn_id: str = GovernanceHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if arguments is not None and not isinstance(arguments, dict):
            raise TypeError(
                f"{self.task_id}: 'arguments' must be a dict of the tool's parameters, got "
                f"{type(arguments).__name__}."
            )
        self.tool = resolve_tools(self.task_id, [tool], registry, parameter="tool")[0]
        self.arguments = arguments or {}
        self.governance_conn_id = governance_conn_id

    @cached_property
    def governance(self) -> GovernanceHook:
        with airflow_errors(self.task_id):  # a governance connection the deployment does not allow
            return GovernanceHook(governance_conn_id=self.governance_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        return self.with_approval(context, lambda: self._run(context))

    def _run(self, context: Context) -> dict[str, Any]:
        if not isinstance(self.arguments, dict):
            raise AirflowFailException(
                f"{self.task_id}: 'arguments' rendered to {type(self.arguments).__name__}, expected a dict."
            )
        governor = self.governance.governor
        runner = GovernedToolRunner(
            governor,
            self.governance.subject_from_context(context),
            [self.tool],
            replay_journal(self.governance) if self.tool.side_effects else None,
        )
        with airflow_errors(self.task_id):
            done = runner.call(self.tool.name, self.arguments, step=TOOL_OPERATOR_STEP)
        self.log.info(
            "tool=%s %s in %.1f ms rule=%s key_sha256=%s",
            done.tool,
            "replayed from the journal" if done.replayed else "ran",
            done.duration_ms,
            done.rule,
            done.idempotency_key_sha256[:16],
        )
        self._lineage_facts = {
            "tool": done.tool,
            "replayed": done.replayed,
            "rule": done.rule,
            "duration_ms": done.duration_ms,
        }
        return {
            "tool": done.tool,
            "result": done.result,
            "replayed": done.replayed,
            "rule": done.rule,
            "idempotency_key_sha256": done.idempotency_key_sha256,
            "duration_ms": done.duration_ms,
            "redactions": done.redactions,
        }

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        facts = getattr(self, "_lineage_facts", None)
        if facts is None:
            return None

        def build(ol: Any, _: Any) -> tuple[list[Any], list[Any], Any]:
            facet = ol.GovernedAIRunFacet(
                operation="tool",
                calls=0 if facts["replayed"] else 1,
                latencyMs=facts["duration_ms"],
                policyRule=facts["rule"],
                policyDecision="allow",
                details={"tool": facts["tool"], "replayed": facts["replayed"]},
            )
            return [], [], facet

        return operator_lineage(build)
