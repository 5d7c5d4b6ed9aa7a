"""A bounded agent loop, written sans-IO: it says what to do next and is told what happened.

::

    loop = AgentLoop(prompt=..., tools=offered, mode="constrained", model="smollm2")
    while (action := loop.next_action()) is not None:
        if isinstance(action, ModelTurn):
            loop.feed_model(call_the_model(action.request))     # a ChatResult
        else:
            loop.feed_tool(run_the_tool(action.call))          # a ToolOutcome
    result = loop.result()

The loop never calls a model or a tool itself, so the governed sync driver
(:class:`~governed_ai.core.tools.agent_runner.GovernedAgent`), an async driver and tests share it.

Bounds: ``max_steps`` model calls, ``max_tool_calls`` attempted tool calls, ``max_tool_errors`` failed ones
(denied, invalid arguments, exceptions), a wall-clock ``timeout_seconds`` and an optional
``max_total_tokens``; every policy budget is enforced on each model call by the governor's reservation.
When tools run out (the last step, or a tool limit is reached) the model is offered only the final answer,
so a run ends with an answer rather than a failure whenever a step is left to give it.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from governed_ai.core.audit import canonical_json
from governed_ai.core.chat import ChatRequest, ChatResult, Message, Usage
from governed_ai.core.llm_settings import StructuredOutputMode
from governed_ai.core.structured_output import parse_reply, repair_message
from governed_ai.core.tools.calls import ToolCall, ToolOutcome
from governed_ai.core.tools.choice import ToolChoiceMode, constrained_step_model, tools_prompt
from governed_ai.core.tools.native import ToolChatRequest
from governed_ai.core.tools.runner import arguments_digest
from governed_ai.core.tools.tool import FINAL_CHOICE, Tool
from governed_ai.core.untrusted import UntrustedText, mark_all_untrusted

StopReason = Literal["final", "max_steps", "timeout", "token_budget"]

DEFAULT_SYSTEM_PROMPT = "You complete the task below, using the tools when they help. Be brief."
# Measured with SmolLM2-135M: a note such as "you cannot use tools any more" gets copied into the answer;
# restating the task gets an answer to it.
_FORCE_FINAL_NOTE = "Now answer: {prompt}"
_REQUIRE_TOOL_NOTE = "Use a tool first; you may answer after its result."
_SKIPPED_NOTE = "Not executed: this task's tool call limit is reached. Give your final answer."
_MAX_TRANSCRIPT_ERROR = 300


class AgentLimits(BaseModel):
    """How far one agent run may go."""

    model_config = ConfigDict(frozen=True)

    max_steps: int = Field(default=6, ge=1, le=100, description="model calls, including the final answer")
    max_tool_calls: int = Field(
        default=5, ge=0, le=100, description="tool calls attempted, denied and failed ones included"
    )
    max_tool_errors: int = Field(
        default=3, ge=0, le=100, description="denied, invalid or failed tool calls before tools are withdrawn"
    )
    timeout_seconds: float = Field(default=300.0, gt=0, description="wall-clock, checked between steps")
    max_total_tokens: int | None = Field(
        default=None, ge=1, description="tokens over all model calls, checked between steps"
    )


@dataclass(frozen=True)
class ModelTurn:
    """Call the model with ``request`` (through the governor) and feed back the result."""

    request: ChatRequest
    step: int


@dataclass(frozen=True)
class ToolTurn:
    """Run ``call`` (through the governed tool runner) and feed back its outcome."""

    call: ToolCall


class AgentStepRecord(BaseModel):
    """One transcript entry: what was chosen and what came of it, without raw arguments or results."""

    step: int
    kind: Literal["tool", "final", "invalid_reply"]
    tool: str | None = None
    decision: Literal["allowed", "denied"] | None = None
    outcome: str
    error: str | None = None
    arguments_sha256: str | None = None


class AgentResult(BaseModel):
    """How an agent run ended. ``final`` is the answer (text, or a dict for an answer schema) or None."""

    final: Any = None
    stop_reason: StopReason
    mode: ToolChoiceMode
    steps: int
    tool_calls: int
    tool_errors: int
    offered_tools: list[str]
    transcript: list[AgentStepRecord]
    usage: Usage
    cost_usd: float
    model: str | None = None  # the model that answered the last step (after routing and fallbacks)

    @property
    def answered(self) -> bool:
        return self.stop_reason == "final"

    def to_xcom(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["usage"]["total_tokens"] = self.usage.total_tokens
        return data


class AgentLoop:
    """State of one agent run; see the module docstring for the protocol.

    :param prompt: The task, as the user message.
    :param tools: The tools offered to the model (already narrowed to what the policy grants by name).
    :param mode: ``constrained`` (JSON-schema choice; works with small local models) or ``native`` (OpenAI
        ``tools=``).
    :param model: Model name or route alias, as the governor resolves it.
    :param system_prompt: Instructions; a short default when None. The tool list is appended to it.
    :param context: Outside text (tickets, retrieved passages) added to the user message as untrusted
        data blocks.
    :param answer_schema: Optional pydantic model the final answer must fit.
    :param limits: Bounds of the run.
    :param require_tool_call: While no tool was called, the model may not answer (it must use a tool).
    :param max_tokens: Reply tokens per model call.
    :param structured_output: How the connection sends JSON schemas (``json_schema`` or ``json_object``).
    :param clock: Monotonic seconds, for the timeout (tests pass a fake clock).
    """

    def __init__(
        self,
        *,
        prompt: str,
        tools: Sequence[Tool],
        mode: ToolChoiceMode,
        model: str,
        system_prompt: str | None = None,
        context: Sequence[UntrustedText] = (),
        answer_schema: type[BaseModel] | None = None,
        limits: AgentLimits | None = None,
        require_tool_call: bool = False,
        max_tokens: int | None = 256,
        temperature: float | None = None,
        max_repair_attempts: int = 1,
        structured_output: StructuredOutputMode = "json_schema",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("constrained", "native"):
            raise ValueError(f"mode must be 'constrained' or 'native', got {mode!r}")
        self.mode: ToolChoiceMode = mode
        self.tools = list(tools)
        self.limits = limits or AgentLimits()
        self._model = model
        self._answer_schema = answer_schema
        self._require_tool_call = require_tool_call
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._max_repair_attempts = max_repair_attempts
        self._structured_output = structured_output
        self._clock = clock
        self._started = clock()

        system = (system_prompt or DEFAULT_SYSTEM_PROMPT).strip()
        user = prompt if not context else f"{prompt}\n\n{mark_all_untrusted(context)}"
        self._prompt = prompt
        self._messages: list[Message] = [
            {"role": "system", "content": f"{system}\n\n{tools_prompt(self.tools, mode=mode)}"},
            {"role": "user", "content": user},
        ]
        self._pending: deque[ToolCall] = deque()
        self._steps = 0
        self._tool_calls = 0
        self._tool_errors = 0
        self._usage = Usage()
        self._cost = 0.0
        self._model_used: str | None = None
        self._final: Any = None
        self._stop: StopReason | None = None
        self._transcript: list[AgentStepRecord] = []

    # -- the protocol ----------------------------------------------------------------------------------

    def next_action(self) -> ModelTurn | ToolTurn | None:
        """What to do next, or None when the run is over."""
        while self._stop is None and self._pending:
            call = self._pending.popleft()
            if not self._tools_left():
                self.feed_tool(
                    ToolOutcome(
                        call=call,
                        tool=call.name if call.name in self._offered_names() else "(not offered)",
                        status="skipped",
                        message=_SKIPPED_NOTE,
                    )
                )
                continue
            return ToolTurn(call)
        if self._stop is not None:
            return None
        if self._clock() - self._started >= self.limits.timeout_seconds:
            self._stop = "timeout"
        elif self._steps >= self.limits.max_steps:
            self._stop = "max_steps"
        elif (
            self.limits.max_total_tokens is not None
            and self._usage.total_tokens >= self.limits.max_total_tokens
        ):
            self._stop = "token_budget"
        if self._stop is not None:
            return None
        return ModelTurn(self._build_request(), self._steps + 1)

    def feed_model(self, result: ChatResult) -> None:
        """The model's reply to the last :class:`ModelTurn` (as the governor returned it: redacted)."""
        self._steps += 1
        self._usage = self._usage + result.usage
        self._cost += result.cost_usd
        self._model_used = result.model
        if self.mode == "constrained":
            self._feed_constrained(result)
        else:
            self._feed_native(result)

    def feed_model_failure(self, error: str) -> None:
        """The last model call produced no usable reply (e.g. structured output failed every repair)."""
        self._steps += 1
        self._record("invalid_reply", outcome="error", error=error)

    def feed_tool(self, outcome: ToolOutcome) -> None:
        """The outcome of the last :class:`ToolTurn` (or of a skipped call)."""
        call = outcome.call
        if outcome.status != "skipped":
            self._tool_calls += 1
        if not outcome.succeeded and outcome.status != "skipped":
            self._tool_errors += 1
        decision: Literal["allowed", "denied"] | None = None
        if outcome.status == "denied":
            decision = "denied"
        elif outcome.status in ("ok", "replayed", "error"):
            decision = "allowed"
        self._record(
            "tool",
            tool=outcome.tool,
            decision=decision,
            outcome=outcome.status,
            error=outcome.error,
            arguments_sha256=_digest_or_none(call.arguments),
        )
        if self.mode == "native":
            self._messages.append({"role": "tool", "tool_call_id": call.call_id, "content": outcome.message})
        else:
            self._messages.append({"role": "user", "content": outcome.message})

    def result(self) -> AgentResult:
        if self._stop is None:
            raise RuntimeError("the agent run is not over: call next_action() until it returns None")
        return AgentResult(
            final=self._final,
            stop_reason=self._stop,
            mode=self.mode,
            steps=self._steps,
            tool_calls=self._tool_calls,
            tool_errors=self._tool_errors,
            offered_tools=[t.name for t in self.tools],
            transcript=list(self._transcript),
            usage=self._usage,
            cost_usd=round(self._cost, 10),
            model=self._model_used,
        )

    @property
    def messages(self) -> list[Message]:
        """The conversation so far (for logs and tests)."""
        return list(self._messages)

    @property
    def steps(self) -> int:
        return self._steps

    # -- building requests -----------------------------------------------------------------------------

    def _offered_names(self) -> set[str]:
        return {t.name for t in self.tools}

    def _tools_left(self) -> bool:
        return (
            bool(self.tools)
            and self._tool_calls < self.limits.max_tool_calls
            and self._tool_errors < self.limits.max_tool_errors
        )

    def _build_request(self) -> ChatRequest:
        last_step = self._steps + 1 >= self.limits.max_steps
        offer_tools = self._tools_left() and not last_step
        allow_final = not (offer_tools and self._require_tool_call and self._tool_calls == 0)
        messages = list(self._messages)
        if not offer_tools and self.tools:
            messages.append({"role": "user", "content": _FORCE_FINAL_NOTE.format(prompt=self._prompt)})
        elif not allow_final:
            messages.append({"role": "user", "content": _REQUIRE_TOOL_NOTE})
        common: dict[str, Any] = {
            "messages": messages,
            "model": self._model,
            "temperature": self._temperature,
            "max_tokens": self._max_tokens,
            "structured_output": self._structured_output,
        }
        if self.mode == "constrained":
            step_model = constrained_step_model(
                self.tools if offer_tools else [],
                allow_final=allow_final,
                answer_schema=self._answer_schema,
                answer_max_chars=_answer_max_chars(self._max_tokens),
            )
            return ChatRequest(
                **common, output_schema=step_model, max_repair_attempts=self._max_repair_attempts
            )
        return ToolChatRequest(
            **common,
            tools=[t.openai_spec() for t in self.tools] if offer_tools else [],
            tool_choice="auto" if allow_final else "required",
            output_schema=self._answer_schema if allow_final else None,
            max_repair_attempts=0,
        )

    # -- reading replies -------------------------------------------------------------------------------

    def _feed_constrained(self, result: ChatResult) -> None:
        output = result.output
        if not isinstance(output, dict) or not isinstance(output.get("tool"), str):
            self._record("invalid_reply", outcome="error", error="the reply was not a tool choice")
            return
        self._messages.append({"role": "assistant", "content": canonical_json(output)})
        choice = output["tool"]
        if choice == FINAL_CHOICE:
            self._finish(output.get("answer"))
            return
        self._pending.append(ToolCall(name=choice, arguments=output.get("arguments"), step=str(self._steps)))

    def _feed_native(self, result: ChatResult) -> None:
        calls = (result.output or {}).get("tool_calls") or []
        if calls:
            self._messages.append(
                {
                    "role": "assistant",
                    "content": result.content,
                    "tool_calls": [
                        {
                            "id": c["id"],
                            "type": "function",
                            "function": {"name": c["name"], "arguments": _as_json_text(c["arguments"])},
                        }
                        for c in calls
                    ],
                }
            )
            for index, c in enumerate(calls, start=1):
                step = str(self._steps) if len(calls) == 1 else f"{self._steps}.{index}"
                self._pending.append(
                    ToolCall(name=c["name"], arguments=c["arguments"], step=step, call_id=c["id"])
                )
            return
        content = result.content or ""
        self._messages.append({"role": "assistant", "content": content})
        if self._require_tool_call and self._tool_calls == 0 and self._tools_left():
            self._record("invalid_reply", outcome="error", error="answered before using a tool")
            self._messages.append({"role": "user", "content": _REQUIRE_TOOL_NOTE})
            return
        if self._answer_schema is None:
            if content.strip():
                self._finish(content)
            else:
                self._record("invalid_reply", outcome="error", error="the reply was empty")
            return
        try:
            parsed = parse_reply(content, self._answer_schema)
        except (ValidationError, ValueError) as error:
            self._record("invalid_reply", outcome="error", error=str(error)[:_MAX_TRANSCRIPT_ERROR])
            self._messages.append(repair_message(error, result.finish_reason))
            return
        self._finish(parsed.model_dump(mode="json"))

    def _finish(self, answer: Any) -> None:
        self._final = answer
        self._stop = "final"
        self._record("final", outcome="ok")

    def _record(self, kind: Literal["tool", "final", "invalid_reply"], **fields: Any) -> None:
        error = fields.get("error")
        if error is not None:
            fields["error"] = str(error)[:_MAX_TRANSCRIPT_ERROR]
        self._transcript.append(AgentStepRecord(step=self._steps, kind=kind, **fields))


def _answer_max_chars(max_tokens: int | None) -> int | None:
    # About three characters per token, after ~16 tokens of JSON around the answer: a text answer that
    # fits stays valid JSON instead of being cut off mid-string by the token limit.
    return None if max_tokens is None else max(16, (max_tokens - 16) * 3)


def _as_json_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _digest_or_none(arguments: Any) -> str | None:
    try:
        return arguments_digest(arguments)
    except (TypeError, ValueError):
        return None
