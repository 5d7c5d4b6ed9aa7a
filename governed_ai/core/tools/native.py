"""One chat call with OpenAI-style native tool calling, written sans-IO like ``StructuredChat``.

The result is an ordinary :class:`~governed_ai.core.chat.ChatResult` whose ``output`` is
``{"tool_calls": [{"id", "name", "arguments"}, ...]}`` when the model called tools, so the governor's
output redaction and audit treat the calls like any other model output.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from governed_ai.core.chat import ChatRequest, ChatResult, CompletionLike, Usage
from governed_ai.core.pricing import PriceTable
from governed_ai.core.structured_output import response_format
from governed_ai.core.tools.choice import parse_native_arguments


class ToolChatRequest(ChatRequest):
    """A chat request that offers tools (OpenAI ``tools=`` entries) to the model."""

    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Literal["auto", "none", "required"] = "auto"


class NativeToolChat:
    """Drives one native tool-calling request: ``next_request()`` once, ``feed()``, then ``result()``.

    No repair loop: what the model sent (tool calls, or text) goes back to the agent, which validates it.
    """

    def __init__(self, request: ChatRequest, prices: PriceTable) -> None:
        self._request = request
        self._prices = prices
        self._completion: CompletionLike | None = None
        self._seconds = 0.0

    def next_request(self) -> dict[str, Any] | None:
        if self._completion is not None:
            return None
        req = self._request
        kwargs: dict[str, Any] = {"model": req.model, "messages": list(req.messages)}
        if req.temperature is not None:
            kwargs["temperature"] = req.temperature
        if req.max_tokens is not None:
            kwargs["max_tokens"] = req.max_tokens
        if isinstance(req, ToolChatRequest) and req.tools and req.tool_choice != "none":
            kwargs["tools"] = req.tools
            kwargs["tool_choice"] = req.tool_choice
        if req.output_schema is not None:
            kwargs["response_format"] = response_format(req.output_schema, req.structured_output)
        if req.extra_body:
            kwargs["extra_body"] = req.extra_body
        return kwargs

    def feed(self, completion: CompletionLike, seconds: float) -> None:
        self._completion = completion
        self._seconds = seconds

    def result(self) -> ChatResult:
        completion = self._completion
        if completion is None:
            raise RuntimeError("result() before feed(): no completion was received")
        usage = Usage()
        if completion.usage is not None:
            usage = Usage(
                prompt_tokens=completion.usage.prompt_tokens or 0,
                completion_tokens=completion.usage.completion_tokens or 0,
            )
        choice = completion.choices[0]
        calls = [
            {
                "id": getattr(call, "id", None) or f"call_{index}",
                "name": call.function.name,
                "arguments": parse_native_arguments(call.function.arguments),
            }
            for index, call in enumerate(getattr(choice.message, "tool_calls", None) or ())
        ]
        return ChatResult(
            content=choice.message.content,
            output={"tool_calls": calls} if calls else None,
            model=getattr(completion, "model", None) or self._request.model,
            usage=usage,
            cost_usd=self._prices.cost(self._request.model, usage.prompt_tokens, usage.completion_tokens),
            latency_ms=round(self._seconds * 1000, 3),
            attempts=1,
            finish_reason=choice.finish_reason,
        )
