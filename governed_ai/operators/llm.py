"""Operator for one LLM call: plain text, or structured output validated into a pydantic model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator
from pydantic import BaseModel

from governed_ai.core.chat import ChatRequest, Message, build_messages
from governed_ai.core.errors import InvalidInput
from governed_ai.core.prompt_version import prompt_version
from governed_ai.core.structured_output import ensure_schema_model
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.hooks.llm import LLMHook
from governed_ai.operators.approval import ApprovalByPolicy
from governed_ai.operators.errors import airflow_errors
from governed_ai.operators.lineage import operator_lineage
from governed_ai.plugins.links import AuditRecordsLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context


class LLMOperator(ApprovalByPolicy, BaseOperator):
    """Send one prompt (or a conversation) to an OpenAI-compatible model and push the result to XCom.

    Every call goes through the governance layer: the policy must grant the model to this DAG/task (or
    route a model alias such as ``default`` to a granted model, with fallbacks), the estimated maximum
    cost is reserved against the applicable budgets and settled with the actual usage, prompts and
    outputs are redacted as the policy says, and every decision and call is written to the audit trail.
    A denial fails the task without retries (``AirflowFailException``) and names the rule to change.

    **Approval by policy.** When a policy rule's ``require_approval`` names the model, or the call's
    estimated worst-case cost is above its threshold, the task asks the policy's approvers through Airflow's
    human-in-the-loop (Airflow 3.1+) before anything is reserved or paid, and waits deferred. Approved: the
    call runs (the answer and the approver are audited); rejected or not answered in time: the task fails
    without retries. See :mod:`governed_ai.operators.approval`.

    **Nothing paid twice.** Every request (the first one and each repair) is journaled before the task
    goes on. When Airflow retries the task, whatever failed (validation, a later step, a crash), requests
    an earlier try completed are replayed from the journal, not paid for again; a reply that never fit
    the schema is not replayed as a success, the retry continues repairing from it.

    The XCom value is a JSON-safe dict (the contract every AI operator shares, see
    :mod:`governed_ai.core.xcom`): ``content`` (the reply text), ``output`` (the reply parsed into
    ``output_schema``, as a dict, or None), ``model``, ``usage`` (``prompt_tokens``,
    ``completion_tokens``, ``total_tokens``), ``cost_usd``, ``latency_ms``, ``attempts``,
    ``replayed_attempts``, ``finish_reason`` and ``governance`` (``rule``, ``prompt_version``,
    ``redactions``, ``fallbacks_tried``).

    :param prompt: The user message. Templated. Either ``prompt`` or ``messages`` is required.
    :param system_prompt: Instructions sent first, as the system message. Templated.
    :param messages: A list of ``{"role": ..., "content": ...}`` dicts placed between the system prompt
        and ``prompt``; for few-shot examples or a prior conversation. Templated.
    :param model: Model name on the endpoint, or a policy route alias such as ``default``; defaults to the
        connection's ``default_model``. Templated.
    :param temperature: Sampling temperature; None keeps the endpoint's default.
    :param max_tokens: Upper bound on tokens in the reply; None keeps the endpoint's default.
    :param output_schema: A pydantic model class. The endpoint is asked for JSON matching its schema, the
        reply is validated, and validation errors are sent back for up to ``max_repair_attempts`` repairs
        before the task fails with a message listing what was wrong.
    :param max_repair_attempts: Repair attempts after an invalid structured reply (0 disables repair).
    :param prompt_name: Optional declared name of the prompt; with ``prompt_version_label`` it forms the
        recorded prompt version ``name@label#hash`` (the hash always covers the prompt's content).
    :param prompt_version_label: Optional declared version of the prompt (requires ``prompt_name``).
    :param max_retries: Retries of one request on transient errors (429 honouring Retry-After, 5xx,
        timeouts, malformed bodies); default: the connection's ``max_retries``.
    :param deadline_seconds: One request's time limit over all its retries; default: the connection's.
    :param llm_conn_id: Connection of type ``governed_ai_llm``.
    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional; default
        ``governed_ai_governance_default``). Only connections the deployment lists in ``[governed_ai]
        allowed_governance_conn_ids`` may be named; any other fails the task before any call.
    """

    operator_extra_links = (AuditRecordsLink(),)

    template_fields: Sequence[str] = ("prompt", "system_prompt", "messages", "model")
    template_fields_renderers = {"prompt": "md", "system_prompt": "md", "messages": "json"}
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        prompt: str | None = None,
        system_prompt: str | None = None,
        messages: list[Message] | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        output_schema: type[BaseModel] | None = None,
        max_repair_attempts: int = 2,
        prompt_name: str | None = None,
        prompt_version_label: str | None = None,
        max_retries: int | None = None,
        deadline_seconds: float | None = None,
        llm_conn_id: str = LLMHook.default_conn_name,
        governance_conn_id: str = GovernanceHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Problems a DAG author can see at parse time are reported then, not at 3 a.m.
        if prompt is None and not messages:
            raise ValueError(f"{self.task_id}: give 'prompt' (a string) or 'messages' (a list of dicts).")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"{self.task_id}: 'max_tokens' must be a positive integer, got {max_tokens}.")
        if not 0 <= max_repair_attempts <= 10:
            raise ValueError(
                f"{self.task_id}: 'max_repair_attempts' must be 0..10, got {max_repair_attempts}."
            )
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.messages = messages
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.output_schema = ensure_schema_model(output_schema, "output_schema")
        self.max_repair_attempts = max_repair_attempts
        self.max_retries = max_retries
        self.deadline_seconds = deadline_seconds
        self.llm_conn_id = llm_conn_id
        self.governance_conn_id = governance_conn_id
        # The version is computed from the templates as written, before Jinja renders them in place.
        self.prompt_version_id = prompt_version(
            prompt if prompt is not None else "",
            system_prompt=system_prompt,
            name=prompt_name,
            version=prompt_version_label,
        ).id

    @cached_property
    def hook(self) -> LLMHook:
        return LLMHook(llm_conn_id=self.llm_conn_id)

    @cached_property
    def governance(self) -> GovernanceHook:
        with airflow_errors(self.task_id):  # a governance connection the deployment does not allow
            return GovernanceHook(governance_conn_id=self.governance_conn_id)

    def rendered_messages(self) -> list[Message]:
        """The conversation after templating, checked for the mistakes templating can introduce."""
        if self.prompt is not None and not str(self.prompt).strip() and not self.messages:
            raise InvalidInput(f"{self.task_id}: 'prompt' rendered to an empty string; nothing to send.")
        if self.messages is not None and not isinstance(self.messages, list):
            raise InvalidInput(
                f"{self.task_id}: 'messages' must be a list of {{'role', 'content'}} dicts, "
                f"got {type(self.messages).__name__}."
            )
        for i, message in enumerate(self.messages or ()):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise InvalidInput(f"{self.task_id}: messages[{i}] needs 'role' and 'content' keys.")
        return build_messages(self.prompt, self.system_prompt, self.messages)

    def execute(self, context: Context) -> dict[str, Any]:
        return self.with_approval(context, lambda: self._call_model(context))

    def _call_model(self, context: Context) -> dict[str, Any]:
        with airflow_errors(self.task_id):
            request = ChatRequest(
                messages=self.rendered_messages(),
                model=self.model or "",
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                output_schema=self.output_schema,
                max_repair_attempts=self.max_repair_attempts,
            )
            with self.governance.governed_client(
                context,
                llm_conn_id=self.llm_conn_id,
                max_retries=self.max_retries,
                deadline_seconds=self.deadline_seconds,
            ) as client:
                governed = client.chat(request, prompt_version=self.prompt_version_id)
        result = governed.result
        self.log.info(
            "model=%s tokens=%d (prompt %d, completion %d) cost=$%.6f latency=%.0f ms attempts=%d "
            "(replayed %d) rule=%s",
            result.model,
            result.usage.total_tokens,
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            result.cost_usd,
            result.latency_ms,
            result.attempts,
            result.replayed_attempts,
            governed.rule,
        )
        self._lineage_facts = {
            "model": result.model,
            "rule": governed.rule,
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "cost_usd": result.cost_usd,
            "latency_ms": result.latency_ms,
            "fallbacks": list(governed.fallbacks_tried),
            "budget_route": governed.budget_route,
            "cache": governed.cache,
        }
        if governed.budget_route is not None:
            route = governed.budget_route
            self.log.info(
                "route %r switched from %s to %s: budget %r is %.0f%% used (threshold %.0f%%)",
                route["requested"], route["from"], route["to"], route["budget"], route["used"] * 100,
                route["threshold"] * 100,
            )  # fmt: skip
        return governed.to_xcom()

    def get_openlineage_facets_on_start(self) -> Any:
        model = self.model or self.hook.settings.default_model or "default"
        return operator_lineage(
            lambda ol, _: ([ol.model_input(self.hook.settings.base_url, model)], [], None)
        )

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        facts = getattr(self, "_lineage_facts", None)
        if facts is None:
            return self.get_openlineage_facets_on_start()

        def build(ol: Any, _: Any) -> tuple[list[Any], list[Any], Any]:
            facet = ol.GovernedAIRunFacet(
                operation="chat",
                model=facts["model"],
                promptVersion=self.prompt_version_id,
                calls=1,
                promptTokens=facts["prompt_tokens"],
                completionTokens=facts["completion_tokens"],
                costUsd=facts["cost_usd"],
                latencyMs=facts["latency_ms"],
                policyRule=facts["rule"],
                policyDecision="allow",
                details={
                    "fallbacks_tried": facts["fallbacks"],
                    **({"budget_route": facts["budget_route"]} if facts.get("budget_route") else {}),
                    **({"cache": facts["cache"]} if facts.get("cache") else {}),
                },
            )
            return [ol.model_input(self.hook.settings.base_url, facts["model"])], [], facet

        return operator_lineage(build)
