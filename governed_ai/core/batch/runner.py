"""The batch engine: many governed model calls from one task, on one event loop.

Each item is rendered into the prompt and sent through the task's :class:`GovernedClient`, with at most
``concurrency`` items in flight. Outcomes go to an :class:`~governed_ai.core.batch.spool.OutcomeSpool` on
disk as items finish, so memory does not grow with the number of items. Everything that governs a call
(authorization against the current policy, routing with fallbacks, redaction, budget blocks, the replay
journal, the audit trail, retries) is the client's, exactly as for a single call; this module only
schedules items and keeps score. Failures are
per item and carry a reason; the batch goes on. A denial (a revoked grant, a policy that no longer loads,
an exhausted budget) stops the batch: items not yet started end ``not_run`` with the denial as reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from governed_ai.core.batch.inputs import BatchItem
from governed_ai.core.batch.output_keys import ItemKeyPresenter
from governed_ai.core.batch.prompt import BatchPrompt, PromptRenderError
from governed_ai.core.batch.spool import OutcomeSpool, SpoolIndex, merged
from governed_ai.core.chat import ChatRequest
from governed_ai.core.client import GovernedClient
from governed_ai.core.errors import GovernanceDenied

ItemStatus = Literal["ok", "replayed", "failed", "not_run"]
_FAILURE_EXAMPLES = 3


class BatchSettings(BaseModel):
    """How hard a batch may push the endpoint."""

    model_config = ConfigDict(frozen=True)

    concurrency: int = Field(default=8, ge=1, le=256, description="calls in flight at once")
    progress_interval_seconds: float = Field(default=10.0, gt=0)


class CallSettings(BaseModel):
    """The model call every item makes (only the messages differ)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    output_schema: type[BaseModel] | None = None
    max_repair_attempts: int = 2


@dataclass
class ItemOutcome:
    key: str
    position: int
    status: ItemStatus
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"key": self.key, "position": self.position, "status": self.status}
        if self.result is not None:
            data.update(self.result)
        if self.error is not None:
            data["error"] = self.error
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ItemOutcome:
        rest = {k: v for k, v in data.items() if k not in ("key", "position", "status", "error")}
        return cls(data["key"], data["position"], data["status"], rest or None, data.get("error"))


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
        """Items answered per second (replays excluded)."""
        return (self.ok + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.done}/{self.total} items done: {self.ok} ok, {self.replayed} replayed, {self.failed} "
            f"failed, {self.not_run} not run; {self.rate:.1f} calls/s; {self.tokens} tokens; "
            f"${self.cost_usd:.6f}; {self.elapsed_s:.1f} s"
        )


@dataclass
class BatchRun:
    """What a batch came to. The outcomes themselves are in spool files (``spools``), read back in item
    order by :meth:`rows`; :meth:`discard` removes the files once the results are published."""

    progress: BatchProgress
    http_retries: int
    budget_reservations: int
    spools: list[SpoolIndex]
    stopped: str | None = None
    stopped_by_budget: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: The governance of the batch as a whole: the first rule and model seen, redactions summed, every
    #: fallback tried.
    rule: str | None = None
    model: str | None = None
    redactions: int = 0
    fallbacks_tried: tuple[str, ...] = ()
    #: The first few failed items, for the task's error message.
    failure_examples: list[ItemOutcome] = field(default_factory=list)
    #: How many processes ran the batch (see :mod:`governed_ai.core.batch.processes`).
    processes: int = 1
    #: Items the response cache answered (nothing paid), and items it was asked about and paid for.
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def cache(self) -> str | None:
        """The batch's ``cache`` in XCom: ``hit`` (every item from the response cache), ``miss`` (none),
        ``partial``, or None when the policy caches none of its requests."""
        if not self.cache_hits + self.cache_misses:
            return None
        return "miss" if not self.cache_hits else "hit" if not self.cache_misses else "partial"

    def rows(self, *, failures_only: bool = False) -> Iterator[bytes]:
        """Each item's JSON line (``ItemOutcome.to_json``), in item order."""
        return merged(self.spools, failures_only=failures_only)

    @property
    def outcomes(self) -> list[ItemOutcome]:
        """Every outcome in item order, in memory: for small batches and tests."""
        return [ItemOutcome.from_json(orjson.loads(line)) for line in self.rows()]

    @property
    def failures(self) -> list[ItemOutcome]:
        return [ItemOutcome.from_json(orjson.loads(line)) for line in self.rows(failures_only=True)]

    def discard(self) -> None:
        for spool in self.spools:
            Path(spool.path).unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        p = self.progress
        return {
            "total": p.total,
            "ok": p.ok,
            "replayed": p.replayed,
            "failed": p.failed,
            "not_run": p.not_run,
            "tokens": p.tokens,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(p.cost_usd, 8),
            "seconds": round(p.elapsed_s, 3),
            "calls_per_second": round(p.rate, 2),
            "http_retries": self.http_retries,
            "budget_reservations": self.budget_reservations,
            "stopped": self.stopped,
            "stopped_by_budget": self.stopped_by_budget,
            "processes": self.processes,
            # Only when the policy caches this batch's requests: the summary's shape is otherwise unchanged.
            **({"cache_hits": self.cache_hits, "cache_misses": self.cache_misses} if self.cache else {}),
        }


@dataclass
class _Counters:
    ok: int = 0
    replayed: int = 0
    failed: int = 0
    not_run: int = 0


@dataclass
class BatchRunner:
    """Runs one batch through ``client``. Build it per task execution; :meth:`run` is a coroutine to run
    on the client's loop (``client.run(runner.run(items))``)."""

    client: GovernedClient
    call: CallSettings
    prompt: BatchPrompt
    settings: BatchSettings = field(default_factory=BatchSettings)
    on_progress: Callable[[BatchProgress], None] | None = None
    clock: Callable[[], float] = time.perf_counter
    #: Where the outcome spool is written (default: the system temp directory).
    spool_directory: str | None = None

    def __post_init__(self) -> None:
        self._counters = _Counters()
        self._stopped: GovernanceDenied | None = None
        self._rule: str | None = None
        self._model: str | None = None
        self._redactions = 0
        self._fallbacks: set[str] = set()
        self._failure_examples: list[ItemOutcome] = []
        self._cache_outcomes: dict[str | None, int] = {}

    async def run(self, items: Sequence[BatchItem], *, total: int | None = None) -> BatchRun:
        """Run ``items``; ``total`` is the whole batch's item count when these are one process's share."""
        started = self.clock()
        work: asyncio.Queue[BatchItem] = asyncio.Queue()
        for item in items:
            work.put_nowait(item)
        count = len(items)
        spool = OutcomeSpool(total if total is not None else count, self.spool_directory)
        # What the outputs may show of each key (the policy's output_item_keys), decided as rows are written.
        self._show_key = ItemKeyPresenter(self.client.governor, self.client.subject, self.client.item_digest)

        def progress() -> BatchProgress:
            c = self._counters
            return BatchProgress(
                total=count,
                done=c.ok + c.replayed + c.failed + c.not_run,
                ok=c.ok,
                replayed=c.replayed,
                failed=c.failed,
                not_run=c.not_run,
                tokens=self.client.paid_prompt_tokens + self.client.paid_completion_tokens,
                cost_usd=self.client.paid_cost,
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
                    item = work.get_nowait()
                except asyncio.QueueEmpty:
                    return
                outcome = await self._one(item)
                spool.add(
                    outcome.position, outcome.status, {**outcome.to_json(), "key": self._show_key(item.key)}
                )

        reporter = asyncio.create_task(report_periodically())
        try:
            await asyncio.gather(*(worker() for _ in range(min(self.settings.concurrency, max(1, count)))))
        except BaseException:
            spool.close()
            raise
        finally:
            reporter.cancel()
            await self.client.budget.close()
        final = progress()
        if self.on_progress is not None:
            self.on_progress(final)
        stopped = self._stopped
        index = spool.index()
        spool.close(remove=False)
        return BatchRun(
            progress=final,
            http_retries=self.client.transport.http_retries,
            budget_reservations=self.client.budget.reservations,
            spools=[index],
            stopped=str(stopped) if stopped is not None else None,
            stopped_by_budget=stopped is not None and stopped.action == "budget",
            prompt_tokens=self.client.paid_prompt_tokens,
            completion_tokens=self.client.paid_completion_tokens,
            rule=self._rule,
            model=self._model,
            redactions=self._redactions,
            fallbacks_tried=tuple(sorted(self._fallbacks)),
            failure_examples=self._failure_examples,
            cache_hits=self._cache_outcomes.get("hit", 0),
            cache_misses=self._cache_outcomes.get("miss", 0),
        )

    async def _one(self, item: BatchItem) -> ItemOutcome:
        if self._stopped is not None:
            return self._not_run(item, f"not run: the batch stopped: {self._stopped}")
        try:
            messages = self.prompt.messages(item.data)
        except PromptRenderError as error:
            return self._failed(item, str(error))
        request = ChatRequest(
            messages=messages,
            model=self.call.model,
            temperature=self.call.temperature,
            max_tokens=self.call.max_tokens,
            output_schema=self.call.output_schema,
            max_repair_attempts=self.call.max_repair_attempts,
        )
        try:
            governed = await self.client.achat(
                request, prompt_version=self.prompt.version_id, item_key=item.key
            )
        except GovernanceDenied as denied:
            # A denial is about the task, not the item: stop starting items (one in-flight window at most).
            if self._stopped is None:
                self._stopped = denied
            return self._not_run(item, f"denied by governance: {denied}")
        except Exception as error:  # every other failure is this item's, with its reason
            return self._failed(item, self.client.describe_error(error))
        self._rule = self._rule or governed.rule
        self._model = self._model or governed.result.model
        self._redactions += governed.redactions
        self._fallbacks.update(governed.fallbacks_tried)
        self._cache_outcomes[governed.cache] = self._cache_outcomes.get(governed.cache, 0) + 1
        if governed.replayed:
            self._counters.replayed += 1
            return ItemOutcome(item.key, item.position, "replayed", governed.to_xcom())
        self._counters.ok += 1
        return ItemOutcome(item.key, item.position, "ok", governed.to_xcom())

    def _failed(self, item: BatchItem, reason: str) -> ItemOutcome:
        self._counters.failed += 1
        outcome = ItemOutcome(item.key, item.position, "failed", error=reason)
        if len(self._failure_examples) < _FAILURE_EXAMPLES:
            shown = ItemOutcome(self._show_key(item.key), item.position, "failed", error=reason)
            self._failure_examples.append(shown)
        return outcome

    def _not_run(self, item: BatchItem, reason: str) -> ItemOutcome:
        self._counters.not_run += 1
        return ItemOutcome(item.key, item.position, "not_run", error=reason)
