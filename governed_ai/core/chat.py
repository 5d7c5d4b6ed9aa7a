"""One chat call, independent of transport: the request, the result, and the structured-output loop.

The loop is written sans-IO: it produces request bodies and consumes :class:`Completion` objects, so the
governed client can run it over the network, replay parts of it from the journal, and tests can drive it
with no server at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from governed_ai.core.errors import StructuredOutputError
from governed_ai.core.llm_settings import StructuredOutputMode
from governed_ai.core.pricing import PriceTable
from governed_ai.core.structured_output import (
    describe_failure,
    parse_reply,
    repair_message,
    response_format,
)
from governed_ai.core.transport import Completion

Message = dict[str, Any]
#: What a driver concluded from one reply: ``{"parsed": <output>}`` or ``{"parsed": None, "failure": <what
#: was wrong>, "repair": <the message asking for a fix>}``.
Verdict = dict[str, Any]


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

    def to_xcom(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


class ChatRequest(BaseModel):
    """What the caller asks for; ``model`` is a model name or a policy route alias such as ``default``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    messages: list[Message]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    output_schema: type[BaseModel] | None = None
    max_repair_attempts: int = Field(default=2, ge=0, le=10)
    structured_output: StructuredOutputMode = "json_schema"
    extra_body: dict[str, Any] | None = None

    def driver(self, prices: PriceTable) -> ChatDriver:
        """The sans-IO loop that turns this request into request bodies and replies into a result."""
        return StructuredChat(self, prices)

    def base_body(self, messages: Sequence[Message]) -> dict[str, Any]:
        """The JSON body of one request with ``messages``; subclasses add their fields."""
        body: dict[str, Any] = {"model": self.model, "messages": list(messages)}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.extra_body:
            body.update(self.extra_body)
        return body


class ChatResult(BaseModel):
    """What a call produced, in a JSON-safe shape suitable for XCom and audit records.

    ``usage`` and ``cost_usd`` cover every attempt the answer took, including attempts an earlier try of
    the task paid for and this one replayed from the journal (``replayed_attempts``).
    """

    content: str | None
    output: dict[str, Any] | None = None
    model: str
    usage: Usage
    cost_usd: float
    latency_ms: float
    attempts: int
    replayed_attempts: int = 0
    finish_reason: str | None = None


class ChatDriver(Protocol):
    """A sans-IO call: ``while (body := d.next_request()) is not None: d.feed(...)``, then ``d.result()``."""

    @property
    def paid_attempts(self) -> int: ...

    def next_request(self) -> dict[str, Any] | None: ...

    def feed(
        self, completion: Completion, seconds: float, *, replayed: bool = ..., verdict: Verdict | None = ...
    ) -> Verdict | None: ...

    def result(self) -> ChatResult: ...


class StructuredChat:
    """Drives one call: the first request, then repair requests while the reply does not fit the schema.

    A try may pay for at most ``1 + max_repair_attempts`` attempts; attempts replayed from the journal (an
    earlier try paid for them) do not count, so a retried task continues repairing where the last try
    stopped instead of asking the same questions again.
    """

    def __init__(self, request: ChatRequest, prices: PriceTable) -> None:
        self._request = request
        self._prices = prices
        self._messages: list[Message] = list(request.messages)
        self._usage = Usage()
        self._latency_s = 0.0
        self._attempts = 0
        self._replayed = 0
        self._done = False
        self._content: str | None = None
        self._parsed: dict[str, Any] | None = None
        self._finish_reason: str | None = None
        self._last_failure = ""
        self._model_seen = request.model
        self._static_format = (
            response_format(request.output_schema, request.structured_output)
            if request.output_schema is not None
            else None
        )

    @property
    def paid_attempts(self) -> int:
        return self._attempts - self._replayed

    def next_request(self) -> dict[str, Any] | None:
        if self._done:
            return None
        body = self._request.base_body(self._messages)
        if self._static_format is not None:
            body["response_format"] = self._static_format
        return body

    def feed(
        self,
        completion: Completion,
        seconds: float,
        *,
        replayed: bool = False,
        verdict: Verdict | None = None,
    ) -> Verdict | None:
        """Take one reply; returns the verdict on it (the parsed output, or the repair to ask for), which
        the journal keeps so that a replay reaches the same conclusion without parsing again."""
        self._attempts += 1
        if replayed:
            self._replayed += 1
        self._latency_s += seconds
        self._model_seen = completion.model or self._model_seen
        self._usage = self._usage + Usage(
            prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens
        )
        self._content = completion.content
        self._finish_reason = completion.finish_reason
        schema = self._request.output_schema
        if schema is None:
            self._done = True
            return None
        if verdict is None:
            verdict = self._judge(schema)
        if verdict.get("parsed") is not None:
            self._parsed = verdict["parsed"]
            self._done = True
            return verdict
        self._last_failure = str(verdict.get("failure") or "")
        if self.paid_attempts > self._request.max_repair_attempts:
            self._done = True
            return verdict
        self._messages.append({"role": "assistant", "content": self._content or ""})
        self._messages.append(dict(verdict["repair"]))
        return verdict

    def _judge(self, schema: type[BaseModel]) -> Verdict:
        try:
            return {"parsed": parse_reply(self._content, schema).model_dump(mode="json")}
        except (ValidationError, ValueError) as err:
            return {
                "parsed": None,
                "failure": describe_failure(err),
                "repair": repair_message(err, self._finish_reason),
            }

    def result(self) -> ChatResult:
        schema = self._request.output_schema
        if schema is not None and self._parsed is None:
            shown = (self._content or "")[:500]
            raise StructuredOutputError(
                f"The model's reply did not match output_schema {schema.__name__} after "
                f"{self._attempts} attempt(s) ({self._replayed} replayed from an earlier try, "
                f"{self._request.max_repair_attempts} repair(s) allowed per try). What was wrong:\n"
                f"{self._last_failure or '- no reply'}\n"
                f"Last reply (first 500 chars): {shown!r}\n"
                "A retry of the task continues the repairs from here without paying again for these "
                "attempts. Or raise max_repair_attempts or max_tokens, simplify the schema, or use a "
                "stronger model.",
                prompt_tokens=self._usage.prompt_tokens,
                completion_tokens=self._usage.completion_tokens,
            )
        return ChatResult(
            content=self._content,
            output=self._parsed,
            model=self._model_seen,
            usage=self._usage,
            cost_usd=self._prices.cost(
                self._request.model, self._usage.prompt_tokens, self._usage.completion_tokens
            ),
            latency_ms=round(self._latency_s * 1000, 3),
            attempts=self._attempts,
            replayed_attempts=self._replayed,
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
