"""Driving an :class:`~governed_ai.core.tools.agent.AgentLoop` through the governance layer (sync).

Every model call goes through ``Governor.chat`` (policy, model routing, budget reservation, redaction,
audit), every tool call through :class:`~governed_ai.core.tools.runner.GovernedToolRunner`. A model-call
denial (model not granted, budget exhausted) ends the run by raising ``GovernanceDenied``; a tool-call
denial does not: the model is told the tool is not permitted and the loop goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from governed_ai.core.chat import ChatRequest, ChatResult
from governed_ai.core.governor import Governor
from governed_ai.core.pricing import PriceTable
from governed_ai.core.structured_output import StructuredOutputError
from governed_ai.core.subject import Subject
from governed_ai.core.tools.agent import AgentLoop, AgentResult, ModelTurn
from governed_ai.core.tools.runner import GovernedToolRunner


@dataclass
class GovernedAgent:
    """Runs agent loops for one task.

    :param governor: The governance layer.
    :param subject: The Airflow task the run is for.
    :param connection_id: The LLM connection (policy grants models per connection).
    :param call_model: Sends one (already governed) request to the endpoint and returns its result; raise
        ``ModelUnavailable`` for endpoint failures so the governor can try a fallback model.
    :param prices: Price table for budget reservations.
    :param tools: The governed tool runner (its tool set decides which names are known at all).
    :param prompt_version: Recorded on every model call's audit record.
    """

    governor: Governor
    subject: Subject
    connection_id: str
    call_model: Callable[[ChatRequest], ChatResult]
    prices: PriceTable
    tools: GovernedToolRunner
    prompt_version: str | None = None

    def run(self, loop: AgentLoop) -> AgentResult:
        """Run ``loop`` to its end and return its result."""
        while (action := loop.next_action()) is not None:
            if isinstance(action, ModelTurn):
                try:
                    governed = self.governor.chat(
                        self.subject,
                        connection_id=self.connection_id,
                        requested_model=action.request.model,
                        request=action.request,
                        call=self.call_model,
                        prices=self.prices,
                        prompt_version=self.prompt_version,
                    )
                except StructuredOutputError as error:
                    # Charged and audited by the governor already; this step is lost, the run goes on.
                    loop.feed_model_failure(str(error).split("\n", 1)[0])
                    continue
                loop.feed_model(governed.result)
            else:
                loop.feed_tool(self.tools.attempt(action.call))
        return loop.result()
