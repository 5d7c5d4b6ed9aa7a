"""One chat call with OpenAI-style native tool calling, written sans-IO like ``StructuredChat``.

The result is an ordinary :class:`~governed_ai.core.chat.ChatResult` whose ``output`` is
``{"tool_calls": [{"id", "name", "arguments"}, ...]}`` when the model called tools, so output redaction and
the audit trail treat the calls like any other model output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from governed_ai.core.chat import ChatDriver, ChatRequest, ChatResult, Message, Usage, Verdict
from governed_ai.core.pricing import PriceTable
from governed_ai.core.structured_output import response_format
from governed_ai.core.tools.choice import parse_native_arguments
from governed_ai.core.transport import Completion


class ToolChatRequest(ChatRequest):
    """A chat request that offers tools (OpenAI ``tools=`` entries) to the model."""

    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Literal["auto", "none", "required"] = "auto"

    def driver(self, prices: PriceTable) -> ChatDriver:
        return NativeToolChat(self, prices)

    def base_body(self, messages: Sequence[Message]) -> dict[str, Any]:
        body = super().base_body(messages)
        if self.tools and self.tool_choice != "none":
            body["tools"] = self.tools
            body["tool_choice"] = self.tool_choice
        if self.output_schema is not None:
            body["response_format"] = response_format(self.output_schema, self.structured_output)
        return body


class NativeToolChat:
    """Drives one native tool-calling request: ``next_request()`` once, ``feed()``, then ``result()``.

    No repair loop: what the model sent (tool calls, or text) goes back to the agent, which validates it.
    """

    def __init__(self, request: ToolChatRequest, prices: PriceTable) -> None:
        self._request = request
        self._prices = prices
        self._completion: Completion | None = None
        self._seconds = 0.0
        self._replayed = False

    @property
    def paid_attempts(self) -> int:
        return 0 if self._completion is None or self._replayed else 1

    def next_request(self) -> dict[str, Any] | None:
        if self._completion is not None:
            return None
        return self._request.base_body(self._request.messages)

    def feed(
        self,
        completion: Completion,
        seconds: float,
        *,
        replayed: bool = False,
        verdict: Verdict | None = None,
    ) -> Verdict | None:
        self._completion = completion
        self._seconds = seconds
        self._replayed = replayed
        return None

    def result(self) -> ChatResult:
        completion = self._completion
        if completion is None:
            raise RuntimeError("result() before feed(): no completion was received")
        calls = [
            {
                "id": call.get("id") or f"call_{index}",
                "name": call.get("name"),
                "arguments": parse_native_arguments(call.get("arguments")),
            }
            for index, call in enumerate(completion.tool_calls)
        ]
        return ChatResult(
            content=completion.content,
            output={"tool_calls": calls} if calls else None,
            model=completion.model or self._request.model,
            usage=Usage(
                prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens
            ),
            cost_usd=self._prices.cost(
                self._request.model, completion.prompt_tokens, completion.completion_tokens
            ),
            latency_ms=round(self._seconds * 1000, 3),
            attempts=1,
            replayed_attempts=1 if self._replayed else 0,
            finish_reason=completion.finish_reason,
        )
