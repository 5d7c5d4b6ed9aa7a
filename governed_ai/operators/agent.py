"""Operator for a bounded, governed agent: the model chooses tools, governance decides, the tools run."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator
from pydantic import BaseModel, ValidationError

from governed_ai.core.errors import GovernanceDenied, InvalidInput
from governed_ai.core.prompt_version import prompt_version
from governed_ai.core.structured_output import ensure_schema_model
from governed_ai.core.tools import (
    AgentLimits,
    AgentLoop,
    AgentResult,
    GovernedAgent,
    GovernedToolRunner,
    Tool,
    ToolChoiceMode,
    ToolRegistry,
    granted_tool_names,
)
from governed_ai.core.untrusted import UntrustedText
from governed_ai.core.xcom import ai_xcom, governance_xcom
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.hooks.llm import LLMHook
from governed_ai.operators.approval import ApprovalByPolicy
from governed_ai.operators.errors import airflow_errors
from governed_ai.operators.lineage import operator_lineage
from governed_ai.operators.tool import replay_journal, resolve_tools
from governed_ai.plugins.links import AuditRecordsLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context


class AgentIncomplete(RuntimeError):
    """The agent hit a limit (steps, time, tokens) before giving a final answer. Retryable: tool calls
    with side effects that completed are replayed from the journal on the retry, not repeated."""


class AgentOperator(ApprovalByPolicy, BaseOperator):
    """Let a model work on a task with tools, in a bounded loop where governance has the last word.

    Each step the model either calls a tool or gives its final answer. Every model call goes through the
    governance layer exactly like :class:`~governed_ai.operators.llm.LLMOperator` (model grant, budget
    reservation, redaction, audit). Every tool call is authorized by the policy with its actual arguments;
    a denied call is not executed, it is audited and the model is told the tool is not permitted. Invalid
    arguments and tool exceptions go back to the model as errors, up to ``max_tool_errors``. Tool results
    reach the model redacted and wrapped as untrusted data. Side-effecting calls are journaled, so a retry
    of the task replays completed calls instead of repeating them. When the policy redacts model outputs,
    the tool choice (arguments included) is redacted like any other output before a tool sees it. A tool or
    model call that a policy rule's ``require_approval`` names makes the task wait for an approver through
    Airflow's human-in-the-loop (:mod:`governed_ai.operators.approval`); approved, the loop runs again with
    the steps already paid replayed from the journal; rejected, the task fails without retries.

    Two ways for the model to choose:

    - ``constrained`` (default): each reply must fit a JSON schema whose ``tool`` choices are only the
      tools the policy grants this task, plus ``final``. Works with small local models (which cannot do
      ``tool_choice="auto"``), and the model cannot even name a withheld tool.
    - ``native``: OpenAI tool calling (``tools=``) with the granted tools, for endpoints that support it.

    XCom: ``final`` (the answer: text, or a dict when ``output_schema`` is set), ``stop_reason``, ``mode``,
    ``steps``, ``tool_calls``, ``tool_errors``, ``offered_tools``, ``withheld_tools`` (listed but not granted
    by the policy), ``transcript`` (per step: tool, allowed/denied, outcome, redacted error, argument hash;
    no raw arguments or results), ``usage`` and ``cost_usd``.

    Model denials (model not granted, budget exhausted) fail the task without retries
    (``AirflowFailException``). Running out of steps, time or tokens without an answer raises
    :class:`AgentIncomplete` (retryable) unless ``require_final_answer=False``.

    :param prompt: The task for the agent (the user message). Templated.
    :param tools: Tool names (looked up in ``registry``) or :class:`~governed_ai.core.tools.Tool` objects
        the agent may try. Only those the policy grants this task are offered to the model.
    :param system_prompt: Instructions; the tool list is appended. Templated.
    :param context: Outside text the agent works on (a ticket, retrieved passages), a string or a list of
        strings; added to the prompt as untrusted data blocks that the model is told not to obey. Templated.
    :param mode: ``constrained`` or ``native`` (see above).
    :param output_schema: Optional pydantic model class the final answer must fit.
    :param require_tool_call: The model must call a tool before it may answer (grounds the answer in a
        tool's data instead of the model's memory).
    :param max_steps: Model calls at most, including the one giving the answer.
    :param max_tool_calls: Tool calls attempted at most (denied and failed ones count); after that only an
        answer is accepted.
    :param max_tool_errors: Denied, invalid or failed tool calls tolerated before tools are withdrawn.
    :param timeout_seconds: Wall-clock limit of the loop, checked between steps (one model call is bounded
        by the connection's timeout, a tool call by the tool).
    :param max_total_tokens: Optional token limit over all model calls of one run, checked between steps.
        Policy budgets apply to every call in any case.
    :param require_final_answer: Fail (retryably) when a limit ends the run without an answer; if False,
        push the result with ``final`` None and the ``stop_reason``.
    :param model: Model name or policy route alias; defaults to the connection's ``default_model``.
        Templated.
    :param temperature: Sampling temperature; None keeps the endpoint's default.
    :param max_tokens: Reply tokens per model call.
    :param registry: Where tool names are looked up; default the process registry that ``@tool`` fills.
    :param max_retries: Retries of one model request on transient errors; default: the connection's.
    :param deadline_seconds: One model request's time limit over all its retries; default: the
        connection's.
    :param llm_conn_id: Connection of type ``governed_ai_llm``.
    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional; default
        ``governed_ai_governance_default``). Only connections the deployment lists in ``[governed_ai]
        allowed_governance_conn_ids`` may be named; any other fails the task before any call.
    """

    operator_extra_links = (AuditRecordsLink(),)

    template_fields: Sequence[str] = ("prompt", "system_prompt", "context", "model")
    template_fields_renderers = {"prompt": "md", "system_prompt": "md", "context": "json"}
    ui_color = "#efe8fe"

    def __init__(
        self,
        *,
        prompt: str,
        tools: Sequence[str | Tool],
        system_prompt: str | None = None,
        context: str | list[str] | None = None,
        mode: ToolChoiceMode = "constrained",
        output_schema: type[BaseModel] | None = None,
        require_tool_call: bool = False,
        max_steps: int = 6,
        max_tool_calls: int = 5,
        max_tool_errors: int = 3,
        timeout_seconds: float = 300.0,
        max_total_tokens: int | None = None,
        require_final_answer: bool = True,
        model: str | None = None,
        temperature: float | None = 0.0,
        max_tokens: int = 256,
        registry: ToolRegistry | None = None,
        max_retries: int | None = None,
        deadline_seconds: float | None = None,
        llm_conn_id: str = LLMHook.default_conn_name,
        governance_conn_id: str = GovernanceHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(prompt, str):
            raise TypeError(f"{self.task_id}: 'prompt' must be a string, got {type(prompt).__name__}.")
        if mode not in ("constrained", "native"):
            raise ValueError(f"{self.task_id}: 'mode' must be 'constrained' or 'native', got {mode!r}.")
        if isinstance(tools, str):
            raise TypeError(
                f"{self.task_id}: 'tools' must be a list of tool names, got the string {tools!r}."
            )
        if max_tokens < 1:
            raise ValueError(f"{self.task_id}: 'max_tokens' must be a positive integer, got {max_tokens}.")
        try:
            self.limits = AgentLimits(
                max_steps=max_steps,
                max_tool_calls=max_tool_calls,
                max_tool_errors=max_tool_errors,
                timeout_seconds=timeout_seconds,
                max_total_tokens=max_total_tokens,
            )
        except ValidationError as error:
            problems = "; ".join(
                f"'{'.'.join(str(p) for p in e['loc'])}': {e['msg']} (got {e.get('input')!r})"
                for e in error.errors(include_url=False)
            )
            raise ValueError(f"{self.task_id}: invalid limits: {problems}") from None
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.context = context
        self.tools = resolve_tools(self.task_id, tools, registry)
        self.mode: ToolChoiceMode = mode
        self.output_schema = ensure_schema_model(output_schema, "output_schema")
        self.require_tool_call = require_tool_call
        self.require_final_answer = require_final_answer
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.deadline_seconds = deadline_seconds
        self.llm_conn_id = llm_conn_id
        self.governance_conn_id = governance_conn_id
        # Versioned from the templates as written, before rendering, like LLMOperator.
        self.prompt_version_id = prompt_version(prompt, system_prompt=system_prompt, name=self.task_id).id

    @cached_property
    def hook(self) -> LLMHook:
        return LLMHook(llm_conn_id=self.llm_conn_id)

    @cached_property
    def governance(self) -> GovernanceHook:
        with airflow_errors(self.task_id):  # a governance connection the deployment does not allow
            return GovernanceHook(governance_conn_id=self.governance_conn_id)

    def untrusted_context(self) -> list[UntrustedText]:
        """The rendered ``context`` as untrusted blocks."""
        if self.context is None:
            return []
        items = [self.context] if isinstance(self.context, str) else self.context
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise InvalidInput(
                f"{self.task_id}: 'context' must render to a string or a list of strings, "
                f"got {type(self.context).__name__}."
            )
        return [UntrustedText(text=item, source=f"context {i + 1}") for i, item in enumerate(items)]

    def execute(self, context: Context) -> dict[str, Any]:
        return self.with_approval(context, lambda: self._run(context))

    def _run(self, context: Context) -> dict[str, Any]:
        with airflow_errors(self.task_id):
            if not str(self.prompt).strip():
                raise InvalidInput(f"{self.task_id}: 'prompt' rendered to an empty string; nothing to do.")
            governor = self.governance.governor
            with self.governance.governed_client(
                context,
                llm_conn_id=self.llm_conn_id,
                max_retries=self.max_retries,
                deadline_seconds=self.deadline_seconds,
            ) as client:
                names = [t.name for t in self.tools]
                granted = set(granted_tool_names(governor.engine(), client.subject, names))
                offered = [t for t in self.tools if t.name in granted]
                withheld = [name for name in names if name not in granted]
                if withheld:
                    self.log.info(
                        "Tools withheld by policy (not offered to the model): %s", ", ".join(withheld)
                    )
                journal = replay_journal(self.governance) if any(t.side_effects for t in self.tools) else None
                agent = GovernedAgent(
                    client=client,
                    tools=GovernedToolRunner(governor, client.subject, self.tools, journal),
                    prompt_version=self.prompt_version_id,
                )
                loop = AgentLoop(
                    prompt=self.prompt,
                    tools=offered,
                    mode=self.mode,
                    model=client.resolve_requested(self.model),
                    system_prompt=self.system_prompt,
                    context=self.untrusted_context(),
                    answer_schema=self.output_schema,
                    limits=self.limits,
                    require_tool_call=self.require_tool_call,
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                    structured_output=client.structured_output,
                )
                try:
                    result = agent.run(loop)
                except GovernanceDenied:
                    self.log.info("Agent stopped after %d step(s) by a governance denial.", loop.steps)
                    raise
        self._log_result(result)
        if not result.answered and self.require_final_answer:
            raise AgentIncomplete(
                f"{self.task_id}: the agent stopped without a final answer ({result.stop_reason}) after "
                f"{result.steps} step(s) and {result.tool_calls} tool call(s). Raise the limit "
                "(max_steps, timeout_seconds, max_total_tokens), simplify the task, or set "
                "require_final_answer=False to accept no answer."
            )
        self._lineage_result = result
        return ai_xcom(
            model=result.model,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            cost_usd=result.cost_usd,
            latency_ms=None,
            governance=governance_xcom(
                rule=agent.rule,
                prompt_version=self.prompt_version_id,
                redactions=agent.redactions,
                fallbacks_tried=sorted(agent.fallbacks_tried),
            ),
            **{k: v for k, v in result.to_xcom().items() if k not in ("usage", "cost_usd", "model")},
            withheld_tools=withheld,
        )

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        result = getattr(self, "_lineage_result", None)
        if result is None:
            return None
        model = result.model or self.model or self.hook.settings.default_model or "default"

        def build(ol: Any, _: Any) -> tuple[list[Any], list[Any], Any]:
            used = sorted({e.tool for e in result.transcript if e.tool and e.decision == "allowed"})
            denied = sorted({e.tool for e in result.transcript if e.tool and e.decision == "denied"})
            facet = ol.GovernedAIRunFacet(
                operation="agent",
                model=model,
                calls=result.steps,
                promptTokens=result.usage.prompt_tokens,
                completionTokens=result.usage.completion_tokens,
                costUsd=result.cost_usd,
                policyDecision="allow",
                details={
                    "stop_reason": result.stop_reason,
                    "tools_used": used,
                    "tools_denied": denied,
                    "tool_calls": result.tool_calls,
                },
            )
            return [ol.model_input(self.hook.settings.base_url, model)], [], facet

        return operator_lineage(build)

    def _log_result(self, result: AgentResult) -> None:
        for entry in result.transcript:
            self.log.info(
                "step %d: %s %s %s%s",
                entry.step,
                entry.kind,
                entry.tool or "",
                entry.decision or "",
                f" -> {entry.outcome}" + (f" ({entry.error})" if entry.error else ""),
            )
        self.log.info(
            "agent stop=%s steps=%d tool_calls=%d tool_errors=%d tokens=%d cost=$%.6f",
            result.stop_reason,
            result.steps,
            result.tool_calls,
            result.tool_errors,
            result.usage.total_tokens,
            result.cost_usd,
        )
