"""Driving an :class:`~governed_ai.core.tools.agent.AgentLoop` through the governance layer.

Every model call goes through the task's :class:`~governed_ai.core.client.GovernedClient` (policy, model
routing, budget, redaction, replay journal, audit), every tool call through
:class:`~governed_ai.core.tools.runner.GovernedToolRunner`. A model-call denial (model not granted, budget
exhausted) ends the run by raising ``GovernanceDenied``; a tool-call denial does not: the model is told the
tool is not permitted and the loop goes on. In constrained mode the model is given a schema that lists only
the granted tools; a reply naming any other tool is refused by that schema and recorded as a ``deny`` of
the tool, like a denied native tool call.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from governed_ai.core.audit import AuditRecord
from governed_ai.core.client import GovernedClient, ReplyCheck
from governed_ai.core.errors import StructuredOutputError
from governed_ai.core.tools.agent import AgentLoop, AgentResult, ModelTurn
from governed_ai.core.tools.runner import MAX_SHOWN_NAME, GovernedToolRunner
from governed_ai.core.tools.tool import FINAL_CHOICE
from governed_ai.core.transport import Completion


@dataclass
class GovernedAgent:
    """Runs agent loops for one task.

    :param client: The task's governed client (its subject, LLM connection and budgets).
    :param tools: The governed tool runner (its tool set decides which names are known at all).
    :param prompt_version: Recorded on every model call's audit record.
    """

    client: GovernedClient
    tools: GovernedToolRunner
    prompt_version: str | None = None

    def __post_init__(self) -> None:
        self.rule: str | None = None
        self.redactions = 0
        self.fallbacks_tried: set[str] = set()

    def run(self, loop: AgentLoop) -> AgentResult:
        """Run ``loop`` to its end on the client's event loop and return its result."""
        return self.client.run(self.arun(loop))

    async def arun(self, loop: AgentLoop) -> AgentResult:
        offered = {t.name for t in loop.tools}
        while (action := loop.next_action()) is not None:
            if isinstance(action, ModelTurn):
                check = self._tool_choice_check(offered) if loop.mode == "constrained" else None
                try:
                    governed = await self.client.achat(
                        action.request, prompt_version=self.prompt_version, check_reply=check
                    )
                except StructuredOutputError as error:
                    # Charged and audited by the client already; this step is lost, the run goes on.
                    loop.feed_model_failure(str(error).split("\n", 1)[0])
                    continue
                self.rule = governed.rule or self.rule
                self.redactions += governed.redactions
                self.fallbacks_tried.update(governed.fallbacks_tried)
                loop.feed_model(governed.result)
            else:
                # Tools are plain (sync) functions; they run off the loop so its connections stay served.
                loop.feed_tool(await asyncio.to_thread(self.tools.attempt, action.call))
        return loop.result()

    def _tool_choice_check(self, offered: set[str]) -> ReplyCheck:
        subject = self.client.subject

        def check(completion: Completion) -> list[AuditRecord]:
            named = _named_tool(completion.content)
            if named is None or named in offered or named == FINAL_CHOICE:
                return []
            shown, _ = self.client.governor.redact_text(
                named[:MAX_SHOWN_NAME], self.client.governor.engine().redaction_for(subject)
            )
            return [
                AuditRecord.for_subject(
                    subject,
                    action="tool.authorize",
                    resource=shown,
                    decision="deny",
                    outcome="denied",
                    error=(
                        f"denied tool {shown!r}: the model chose it, but the policy does not grant it to "
                        f"this task (offered: {', '.join(sorted(offered)) or 'none'}); it was not run"
                    ),
                    extra={"mode": "constrained"},
                )
            ]

        return check


def _named_tool(content: str | None) -> str | None:
    """The ``tool`` a constrained reply names, if it is a JSON object that names one."""
    if not content:
        return None
    try:
        data = json.loads(content)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("tool"), str):
        return str(data["tool"])
    return None
