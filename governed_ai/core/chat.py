"""One chat call, independent of transport: the request, the result, and the structured-output loop.

The loop is written sans-IO (it produces request arguments and consumes responses) so the sync hook, the
async hook and tests drive exactly the same logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from governed_ai.core.llm_settings import StructuredOutputMode
from governed_ai.core.pricing import PriceTable
from governed_ai.core.structured_output import (
    StructuredOutputError,
    describe_failure,
    parse_reply,
    repair_message,
    response_format,
)

Message = dict[str, Any]


class Usage(BaseModel):
    """Tokens, summed over every attempt a call needed."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class ChatRequest(BaseModel):
    """What the caller asks for; ``model`` is the concrete model name, already resolved."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    messages: list[Message]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    output_schema: type[BaseModel] | None = None
    max_repair_attempts: int = Field(default=2, ge=0, le=10)
    structured_output: StructuredOutputMode = "json_schema"
    extra_body: dict[str, Any] | None = None


class ChatResult(BaseModel):
    """What a call produced, in a JSON-safe shape suitable for XCom and audit records."""

    content: str | None
    output: dict[str, Any] | None = None
    model: str
    usage: Usage
    cost_usd: float
    latency_ms: float
    attempts: int
    finish_reason: str | None = None

    def to_xcom(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["usage"]["total_tokens"] = self.usage.total_tokens
        return data


class CompletionLike(Protocol):
    """The part of ``openai.types.chat.ChatCompletion`` the loop reads."""

    @property
    def choices(self) -> Sequence[Any]: ...

    @property
    def usage(self) -> Any: ...

    @property
    def model(self) -> str: ...


class StructuredChat:
    """Drives one call: first request, then up to ``max_repair_attempts`` repair requests.

    Use: ``while (kwargs := chat.next_request()) is not None: chat.feed(create(**kwargs), seconds)``,
    then ``chat.result()``.
    """

    def __init__(self, request: ChatRequest, prices: PriceTable) -> None:
        self._request = request
        self._prices = prices
        self._messages: list[Message] = list(request.messages)
        self._usage = Usage()
        self._latency_s = 0.0
        self._attempts = 0
        self._done = False
        self._content: str | None = None
        self._parsed: BaseModel | None = None
        self._finish_reason: str | None = None
        self._last_error: Exception | None = None
        self._model_seen = request.model

    def next_request(self) -> dict[str, Any] | None:
        if self._done:
            return None
        req = self._request
        kwargs: dict[str, Any] = {"model": req.model, "messages": list(self._messages)}
        if req.temperature is not None:
            kwargs["temperature"] = req.temperature
        if req.max_tokens is not None:
            kwargs["max_tokens"] = req.max_tokens
        if req.output_schema is not None:
            kwargs["response_format"] = response_format(req.output_schema, req.structured_output)
        if req.extra_body:
            kwargs["extra_body"] = req.extra_body
        return kwargs

    def feed(self, completion: CompletionLike, seconds: float) -> None:
        self._attempts += 1
        self._latency_s += seconds
        self._model_seen = getattr(completion, "model", None) or self._model_seen
        if completion.usage is not None:
            self._usage = self._usage + Usage(
                prompt_tokens=completion.usage.prompt_tokens or 0,
                completion_tokens=completion.usage.completion_tokens or 0,
            )
        choice = completion.choices[0]
        self._content = choice.message.content
        self._finish_reason = choice.finish_reason
        schema = self._request.output_schema
        if schema is None:
            self._done = True
            return
        try:
            self._parsed = parse_reply(self._content, schema)
            self._done = True
            return
        except (ValidationError, ValueError) as err:
            self._last_error = err
        if self._attempts > self._request.max_repair_attempts:
            self._done = True
            return
        self._messages.append({"role": "assistant", "content": self._content or ""})
        self._messages.append(repair_message(self._last_error, self._finish_reason))

    def result(self) -> ChatResult:
        schema = self._request.output_schema
        if schema is not None and self._parsed is None:
            shown = (self._content or "")[:500]
            raise StructuredOutputError(
                f"The model's reply did not match output_schema {schema.__name__} after "
                f"{self._attempts} attempt(s) ({self._request.max_repair_attempts} repair(s) allowed). "
                f"What was wrong:\n{describe_failure(self._last_error or ValueError('no reply'))}\n"
                f"Last reply (first 500 chars): {shown!r}\n"
                "Raise max_repair_attempts or max_tokens, simplify the schema, or use a stronger model.",
                prompt_tokens=self._usage.prompt_tokens,
                completion_tokens=self._usage.completion_tokens,
            )
        return ChatResult(
            content=self._content,
            output=self._parsed.model_dump(mode="json") if self._parsed is not None else None,
            model=self._model_seen,
            usage=self._usage,
            cost_usd=self._prices.cost(
                self._request.model, self._usage.prompt_tokens, self._usage.completion_tokens
            ),
            latency_ms=round(self._latency_s * 1000, 3),
            attempts=self._attempts,
            finish_reason=self._finish_reason,
        )


def build_messages(
    prompt: str | None, system_prompt: str | None, messages: Sequence[Message] | None
) -> list[Message]:
    """Combine the three ways an operator can state a conversation into one message list."""
    result: list[Message] = []
    if system_prompt:
        result.append({"role": "system", "content": system_prompt})
    result.extend(dict(m) for m in messages or ())
    if prompt:
        result.append({"role": "user", "content": prompt})
    return result
