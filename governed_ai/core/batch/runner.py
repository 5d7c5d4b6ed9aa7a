"""The batch engine: many governed model calls from one task, on one event loop.

Per item: replay from the journal if a previous try completed it; otherwise take a concurrency slot,
a budget slot (reserved in blocks) and rate-limit tokens, redact the prompt, call the model with
per-item retries on transient errors, redact the reply, audit it (buffered), and journal it before the
slot is freed. Failures are per item and carry a reason; the batch goes on. Airflow-free: the operator
hands in an ``AsyncOpenAI`` client, the governor and the subject.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from aiolimiter import AsyncLimiter
from pydantic import BaseModel, ConfigDict, Field

from governed_ai.core.audit import AuditBuffer, AuditRecord
from governed_ai.core.batch.budget_blocks import BlockTicket, BudgetBlocks, BudgetStop
from governed_ai.core.batch.inputs import BatchItem
from governed_ai.core.batch.item_journal import JournalWriter
from governed_ai.core.batch.prompt import BatchPrompt, PromptRenderError
from governed_ai.core.batch.retry import MalformedResponse, item_retrying
from governed_ai.core.chat import ChatRequest, ChatResult, Message, StructuredChat
from governed_ai.core.governor import DEFAULT_COMPLETION_RESERVE, Governor
from governed_ai.core.llm_settings import StructuredOutputMode
from governed_ai.core.policy import Decision, RedactionSettings
from governed_ai.core.pricing import PriceTable, estimate_prompt_tokens
from governed_ai.core.structured_output import StructuredOutputError
from governed_ai.core.subject import Subject

if TYPE_CHECKING:
    from openai import AsyncOpenAI

ItemStatus = Literal["ok", "replayed", "failed", "not_run"]


class BatchSettings(BaseModel):
    """How hard a batch may push the endpoint."""

    model_config = ConfigDict(frozen=True)

    concurrency: int = Field(default=8, ge=1, le=256, description="calls in flight at once")
    max_attempts: int = Field(default=4, ge=1, le=20, description="tries per HTTP exchange of an item")
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    budget_block_size: int = Field(default=16, ge=1, le=1000)
    progress_interval_seconds: float = Field(default=10.0, gt=0)


class CallSettings(BaseModel):
    """The model call every item makes (only the messages differ)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    output_schema: type[BaseModel] | None = None
    max_repair_attempts: int = 2
    structured_output: StructuredOutputMode = "json_schema"


@dataclass
class ItemOutcome:
    key: str
    position: int
    status: ItemStatus
    result: dict[str, Any] | None = None
    error: str | None = None
    http_attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"key": self.key, "position": self.position, "status": self.status}
        if self.result is not None:
            data.update(self.result)
        if self.error is not None:
            data["error"] = self.error
        return data


@dataclass(frozen=True)
class BatchProgress:
    total: int
    done: int
    ok: int
    replayed: int
    failed: int
    not_run: int
    tokens: int
    cost_usd: float
    elapsed_s: float

    @property
    def rate(self) -> float:
        """Calls per second (replays excluded)."""
        return (self.ok + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.done}/{self.total} items done: {self.ok} ok, {self.replayed} replayed, {self.failed} "
            f"failed, {self.not_run} not run; {self.rate:.1f} calls/s; {self.tokens} tokens; "
            f"${self.cost_usd:.6f}; {self.elapsed_s:.1f} s"
        )


@dataclass
class BatchRun:
    outcomes: list[ItemOutcome]
    progress: BatchProgress
    http_retries: int
    budget_reservations: int
    stopped_by_budget: str | None = None

    @property
    def failures(self) -> list[ItemOutcome]:
        return [o for o in self.outcomes if o.status in ("failed", "not_run")]

    def summary(self) -> dict[str, Any]:
        p = self.progress
        return {
            "total": p.total,
            "ok": p.ok,
            "replayed": p.replayed,
            "failed": p.failed,
            "not_run": p.not_run,
            "tokens": p.tokens,
            "cost_usd": round(p.cost_usd, 8),
            "seconds": round(p.elapsed_s, 3),
            "calls_per_second": round(p.rate, 2),
            "http_retries": self.http_retries,
            "budget_reservations": self.budget_reservations,
            "stopped_by_budget": self.stopped_by_budget,
        }


@dataclass
class _Counters:
    ok: int = 0
    replayed: int = 0
    failed: int = 0
    not_run: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    http_retries: int = 0


def per_minute_limiter(per_minute: float, *, largest: float = 1.0) -> AsyncLimiter:
    """A limiter for ``per_minute`` units (requests or tokens) that spreads them over the minute.

    ``AsyncLimiter(per_minute, 60)`` would let a whole minute's quota go out in the first instant, and
    providers enforce per-minute limits over shorter windows (OpenAI: 60,000/min may be enforced as
    1,000/s). The bucket holds a second's share instead, or the ``largest`` single acquisition if that
    is more (a bucket smaller than one acquisition would refuse it), refilled at ``per_minute / 60``.
    """
    burst = max(per_minute / 60, largest, 1.0)
    return AsyncLimiter(burst, burst * 60 / per_minute)


def _content_for_audit(messages: Sequence[Message], result: ChatResult) -> str:
    """The exchange as the governor audits it when the policy sets ``store_content``."""
    prompt = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in messages)
    reply = result.content if result.output is None else str(result.output)
    return f"{prompt}\n[assistant] {reply}"[:20_000]


def _check_completion(completion: Any) -> None:
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
        raise MalformedResponse(f"response has no usable choices: {str(completion)[:200]}")


@dataclass
class BatchRunner:
    """Runs one batch. Build it per task execution; :meth:`run` is a coroutine."""

    governor: Governor
    subject: Subject
    client: AsyncOpenAI
    connection_id: str
    decision: Decision
    call: CallSettings
    prompt: BatchPrompt
    prices: PriceTable
    audit: AuditBuffer
    journal: JournalWriter | None = None
    replayed: dict[str, Any] = field(default_factory=dict)
    settings: BatchSettings = field(default_factory=BatchSettings)
    on_progress: Callable[[BatchProgress], None] | None = None
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        cap = self.decision.max_tokens_per_call
        max_tokens = self.call.max_tokens
        if cap is not None:
            max_tokens = min(max_tokens or cap, cap)
        self._max_tokens = max_tokens
        self._attempts_per_item = 1 + (self.call.max_repair_attempts if self.call.output_schema else 0)
        self._counters = _Counters()
        rpm = self.settings.requests_per_minute
        self._requests = per_minute_limiter(rpm) if rpm else None
        self._tokens: AsyncLimiter | None = None  # sized in run(), once the largest item is known
        self._resource = f"{self.connection_id}/{self.call.model}"

    # -- estimates ----------------------------------------------------------------------------------

    def _estimate(self, messages: Sequence[Message]) -> tuple[int, int]:
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        prompt = estimate_prompt_tokens(chars) * self._attempts_per_item
        completion = (self._max_tokens or DEFAULT_COMPLETION_RESERVE) * self._attempts_per_item
        return prompt, completion

    # -- the batch ------------------------------------------------------------------------------------

    async def run(self, items: Sequence[BatchItem]) -> BatchRun:
        started = self.clock()
        outcomes: dict[int, ItemOutcome] = {}
        pending: list[tuple[BatchItem, list[Message]]] = []
        for item in items:
            if item.key in self.replayed:
                outcomes[item.position] = ItemOutcome(
                    item.key, item.position, "replayed", self.replayed[item.key]
                )
                self._counters.replayed += 1
                continue
            try:
                messages = self.prompt.messages(item.data)
            except PromptRenderError as error:
                outcomes[item.position] = ItemOutcome(item.key, item.position, "failed", error=str(error))
                self._counters.failed += 1
                continue
            pending.append((item, messages))
        if self.replayed:
            self.audit.add(
                AuditRecord.for_subject(
                    self.subject,
                    action="batch.replay",
                    resource=self._resource,
                    decision="n/a",
                    model=self.call.model,
                    prompt_version=self.prompt.version_id,
                    extra={"replayed": self._counters.replayed},
                )
            )
        worst = max((sum(self._estimate(m)) for _, m in pending), default=0)
        worst_prompt = max((self._estimate(m)[0] for _, m in pending), default=0)
        budget = BudgetBlocks(
            self.governor,
            self.subject,
            item_tokens=worst,
            item_cost_usd=self.prices.cost(self.call.model, worst_prompt, worst - worst_prompt),
            resource=self._resource,
            model=self.call.model,
            block_size=self.settings.budget_block_size,
        )
        if self.settings.tokens_per_minute:
            self._tokens = per_minute_limiter(self.settings.tokens_per_minute, largest=worst)
        work: asyncio.Queue[tuple[BatchItem, list[Message]]] = asyncio.Queue()
        for entry in pending:
            work.put_nowait(entry)
        total = len(items)

        def progress() -> BatchProgress:
            c = self._counters
            return BatchProgress(
                total=total,
                done=c.ok + c.replayed + c.failed + c.not_run,
                ok=c.ok,
                replayed=c.replayed,
                failed=c.failed,
                not_run=c.not_run,
                tokens=c.tokens,
                cost_usd=c.cost_usd,
                elapsed_s=self.clock() - started,
            )

        async def report_periodically() -> None:
            while True:
                await asyncio.sleep(self.settings.progress_interval_seconds)
                if self.on_progress is not None:
                    self.on_progress(progress())

        async def worker() -> None:
            while True:
                try:
                    item, messages = work.get_nowait()
                except asyncio.QueueEmpty:
                    return
                outcomes[item.position] = await self._one(item, messages, budget)

        reporter = asyncio.create_task(report_periodically())
        try:
            await asyncio.gather(
                *(worker() for _ in range(min(self.settings.concurrency, max(1, len(pending)))))
            )
        finally:
            reporter.cancel()
            await budget.close()
            await asyncio.to_thread(self.audit.flush)
        final = progress()
        if self.on_progress is not None:
            self.on_progress(final)
        return BatchRun(
            outcomes=[outcomes[i.position] for i in items],
            progress=final,
            http_retries=self._counters.http_retries,
            budget_reservations=budget.reservations,
            stopped_by_budget=budget.stopped,
        )

    async def _one(self, item: BatchItem, messages: list[Message], budget: BudgetBlocks) -> ItemOutcome:
        redaction = self.decision.redaction
        redactions = 0
        if redaction.prompts:
            messages, redactions = self._redact_messages(messages, redaction)
        try:
            ticket = await budget.take()
        except BudgetStop as stop:
            self._counters.not_run += 1
            return ItemOutcome(item.key, item.position, "not_run", error=f"budget exhausted: {stop}")
        prompt_tokens, completion_tokens = self._estimate(messages)
        request = ChatRequest(
            messages=messages,
            model=self.call.model,
            temperature=self.call.temperature,
            max_tokens=self._max_tokens,
            output_schema=self.call.output_schema,
            max_repair_attempts=self.call.max_repair_attempts,
            structured_output=self.call.structured_output,
        )
        started = self.clock()
        http_attempts = 0
        try:
            result, http_attempts = await self._chat(request, prompt_tokens + completion_tokens)
        except StructuredOutputError as error:
            spent = self.prices.cost(self.call.model, error.prompt_tokens, error.completion_tokens)
            return await self._failed(
                item, ticket, budget, error, started, http_attempts,
                tokens=(error.prompt_tokens, error.completion_tokens), cost=spent,
            )  # fmt: skip
        except Exception as error:  # every failure becomes this item's reason, not the batch's
            return await self._failed(item, ticket, budget, error, started, getattr(error, "_attempts", 0))
        await budget.finish(ticket, result.usage.total_tokens, result.cost_usd)
        if redaction.outputs:
            content_text, output = result.content, result.output
            if content_text:
                content_text, found = self.governor.redact_text(content_text, redaction)
                redactions += found
            if output is not None:
                output, found = self.governor.redact_obj(output, redaction)
                redactions += found
            result = result.model_copy(update={"content": content_text, "output": output})
        content = None
        if redaction.store_content:
            content = _content_for_audit(messages, result)
            if not (redaction.prompts and redaction.outputs):
                # The audit trail keeps only redacted text, even of parts the model or XCom got raw.
                content, _ = self.governor.redact_text(content, redaction)
        payload = result.to_xcom()
        record = AuditRecord.for_subject(
            self.subject,
            action="model.call",
            resource=self._resource,
            decision="allow",
            rule=self.decision.rule,
            model=self.call.model,
            prompt_version=self.prompt.version_id,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            cost_usd=result.cost_usd,
            latency_ms=round((self.clock() - started) * 1000, 3),
            content=content,
            extra={
                "item": item.key[:64],
                "attempts": result.attempts,
                "http_attempts": http_attempts,
                "redactions": redactions,
            },
        )
        if self.journal is not None:
            # Audited and journaled, durably, before the slot is freed: a kill loses neither.
            await self.journal.write(item.key, payload, record)
        else:
            self.audit.add(record)
        self._counters.ok += 1
        self._counters.tokens += result.usage.total_tokens
        self._counters.cost_usd += result.cost_usd
        return ItemOutcome(item.key, item.position, "ok", payload, http_attempts=http_attempts)

    def _redact_messages(
        self, messages: list[Message], settings: RedactionSettings
    ) -> tuple[list[Message], int]:
        """Redact what the messages say; roles and keys are fixed strings, not worth a scan per item."""
        redacted: list[Message] = []
        found = 0
        for message in messages:
            content = message.get("content")
            if isinstance(content, str):
                content, count = self.governor.redact_text(content, settings)
            else:  # structured content parts
                content, count = self.governor.redact_obj(content, settings)
            found += count
            redacted.append({**message, "content": content})
        return redacted, found

    async def _failed(
        self,
        item: BatchItem,
        ticket: BlockTicket,
        budget: BudgetBlocks,
        error: BaseException,
        started: float,
        http_attempts: int,
        *,
        tokens: tuple[int, int] = (0, 0),
        cost: float = 0.0,
    ) -> ItemOutcome:
        await budget.finish(ticket, sum(tokens), cost)
        reason, _ = self.governor.redact_text(
            f"{type(error).__name__}: {error}"[:1000], self.decision.redaction
        )
        record = AuditRecord.for_subject(
            self.subject,
            action="model.call",
            resource=self._resource,
            decision="allow",
            rule=self.decision.rule,
            model=self.call.model,
            prompt_version=self.prompt.version_id,
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
            cost_usd=cost,
            latency_ms=round((self.clock() - started) * 1000, 3),
            outcome="error",
            error=reason,
            extra={"item": item.key[:64], "http_attempts": http_attempts},
        )
        if self.journal is not None:
            await self.journal.record_audit(record)
        else:
            self.audit.add(record)
        self._counters.failed += 1
        self._counters.tokens += sum(tokens)
        self._counters.cost_usd += cost
        return ItemOutcome(item.key, item.position, "failed", error=reason, http_attempts=http_attempts)

    async def _chat(self, request: ChatRequest, estimated_tokens: int) -> tuple[ChatResult, int]:
        loop = StructuredChat(request, self.prices)
        http_attempts = 0
        while (kwargs := loop.next_request()) is not None:
            try:
                async for attempt in item_retrying(self.settings.max_attempts):
                    with attempt:
                        http_attempts += 1
                        if http_attempts > 1:
                            self._counters.http_retries += 1
                        if self._requests is not None:
                            await self._requests.acquire()
                        if self._tokens is not None:
                            await self._tokens.acquire(
                                min(estimated_tokens, self._tokens.max_rate)
                            )  # <= burst
                        sent = self.clock()
                        try:
                            completion = await self.client.chat.completions.create(**kwargs)
                        except json.JSONDecodeError as error:
                            raise MalformedResponse(f"response body is not JSON: {error.msg}") from error
                        _check_completion(completion)
            except Exception as error:
                error._attempts = http_attempts  # type: ignore[attr-defined]  # reported with the failure
                raise
            loop.feed(completion, self.clock() - sent)
        return loop.result(), http_attempts
