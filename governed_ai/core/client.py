"""The governed client: the one path from the provider to a model or an embedding endpoint.

Every operator (single calls, structured output and its repairs, agent steps in both modes, batch items,
embeddings for ingest and query) sends its requests through a :class:`GovernedClient`. For each request
that would be paid for, in this order:

1. **authorize** against the policy as it is *now* (the engine is cached and versioned, so this costs
   microseconds): a revoked grant or a policy that no longer loads denies the very next request of a
   running task, batches included; every refusal is an audit ``deny`` record;
2. **route**: a role such as ``default`` becomes the policy's model, with fallbacks tried in order when a
   model is not served or keeps failing;
3. **redact** the request as the policy says, before it leaves;
4. **replay** it from the journal if an earlier try of this task instance already paid for the same
   request (the journal key is a digest of the task instance and the whole request body), else
5. **reserve** its worst case against every budget that applies (denied when it does not fit), **claim**
   it in the journal, send it (through the transport's one retry policy), **complete** it in the journal
   together with its audit record in one group commit, and **settle** the budget with the real usage.

Between 4 and 5, when the policy turns the response cache on for the model (a rule's ``cache``), the
request is looked up in the governed response cache (:mod:`governed_ai.core.response_cache`): a hit is
answered from the store (nothing reserved or sent, $0, audited as a ``*.cache_hit`` record, ``cache: hit``
in the XCom's ``governance``); a miss is paid for as above and its (redacted) reply stored in the same
group commit.

Airflow-free: hooks build the transport (from the LLM connection) and the governor (from the governance
connection); operators call :meth:`GovernedClient.chat`, :meth:`~GovernedClient.embed` or, for batches,
run coroutines on the client's own event loop with :meth:`~GovernedClient.run`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import fnmatch
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson

from governed_ai.core.approval import ApprovalGate
from governed_ai.core.audit import AuditRecord
from governed_ai.core.budget import DEFAULT_WAIT_SECONDS, BudgetGate
from governed_ai.core.chat import ChatRequest, ChatResult, Message, Verdict
from governed_ai.core.errors import (
    ConfigurationError,
    GovernanceDenied,
    ModelCallError,
    ModelUnavailable,
)
from governed_ai.core.governor import Governor
from governed_ai.core.journal import (
    JournalEntry,
    JournalState,
    ReplayJournal,
    StepClaim,
    StepDone,
    StepFailed,
)
from governed_ai.core.llm_settings import StructuredOutputMode
from governed_ai.core.policy import CacheSettings, Decision, PolicyEngine
from governed_ai.core.pricing import PriceTable
from governed_ai.core.response_cache import CachedReply, CacheWrite, ResponseCache, cache_key
from governed_ai.core.store_writer import StoreWriter
from governed_ai.core.subject import Subject
from governed_ai.core.tokens import InputTooLarge, count_messages, token_counter
from governed_ai.core.transport import Completion, Embeddings, ModelTransport
from governed_ai.core.xcom import ai_xcom, governance_xcom

# Reserve for this many completion tokens when a request sets no max_tokens: budgets need an upper bound.
DEFAULT_COMPLETION_RESERVE = 1024
# What the audit trail keeps of one exchange's text when the policy stores content (already redacted).
_MAX_AUDIT_CONTENT = 20_000
_MAX_ERROR = 2_000
# What a request answered by the response cache consumed (its audit record says so).
_NOTHING_PAID: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}

T = TypeVar("T")
#: Looks at each paid reply and returns audit records to add to it (e.g. an agent's refused tool choice).
ReplyCheck = Callable[[Completion], Sequence[AuditRecord]]


@dataclass(frozen=True)
class GovernedChatResult:
    """A model call's result plus what governance decided about it."""

    result: ChatResult
    rule: str | None
    prompt_version: str | None
    redactions: int
    fallbacks_tried: tuple[str, ...] = ()
    #: Set when a route switched to its cheaper model near a budget's limit:
    #: requested, from, to, budget, used.
    budget_route: dict[str, Any] | None = None
    #: The response cache: ``hit`` (answered from it, nothing paid), ``miss`` (paid, reply stored), or
    #: None when the policy does not cache this request.
    cache: str | None = None

    @property
    def replayed(self) -> bool:
        """Every attempt came from the journal: nothing was paid for by this try."""
        return self.result.attempts > 0 and self.result.replayed_attempts == self.result.attempts

    def governance(self) -> dict[str, Any]:
        governance = governance_xcom(
            rule=self.rule,
            prompt_version=self.prompt_version,
            redactions=self.redactions,
            fallbacks_tried=self.fallbacks_tried,
            cache=self.cache,
        )
        if self.budget_route is not None:
            governance["budget_route"] = dict(self.budget_route)
        return governance

    def to_xcom(self) -> dict[str, Any]:
        r = self.result
        return ai_xcom(
            model=r.model,
            prompt_tokens=r.usage.prompt_tokens,
            completion_tokens=r.usage.completion_tokens,
            cost_usd=r.cost_usd,
            latency_ms=r.latency_ms,
            governance=self.governance(),
            content=r.content,
            output=r.output,
            attempts=r.attempts,
            replayed_attempts=r.replayed_attempts,
            finish_reason=r.finish_reason,
        )


@dataclass(frozen=True)
class _RedactedReply:
    """A paid reply as kept: ``content``/``output`` for the result; ``completion``/``verdict`` for the
    journal; ``found`` redactions."""

    content: str | None
    output: dict[str, Any] | None
    found: int
    completion: dict[str, Any] | None = None
    verdict: Verdict | None = None


@dataclass(frozen=True)
class GovernedEmbeddings:
    """Vectors for the (redacted) inputs, in input order, and what they cost."""

    vectors: np.ndarray
    model: str
    prompt_tokens: int
    cost_usd: float
    rule: str | None
    redactions: int
    replayed: bool
    #: Answered from the response cache (nothing sent, $0).
    cached: bool = False


class _LoopThread:
    """An event loop on its own thread, so sync code (operators, tools) can use the async client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="governed-ai-client", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.submit(coroutine).result()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class GovernedClient:
    """Governed requests for one task (``subject``) through one LLM connection.

    :param budget_block_size: requests whose worst case is reserved per ledger transaction (1 for a few
        calls; a batch uses more, see :mod:`governed_ai.core.budget`).
    :param deadline_seconds: per-request limit over all retries (default: the connection's).
    :param budget_wait_seconds: how long a request may wait for held budget to clear (see BudgetGate).
    :param on_wait: receives progress lines while a request waits for budget (the task log).
    :param tokenizer: the connection's ``tokenizer`` setting (how prompt tokens are counted).
    :param replay_current_try: also replay what this try completed before: set when the try resumes after
        waiting for an approval (its earlier part ran in a process that has ended), so the re-run pays
        nothing twice.
    """

    def __init__(
        self,
        governor: Governor,
        transport: ModelTransport,
        subject: Subject,
        *,
        connection_id: str,
        prices: PriceTable,
        structured_output: StructuredOutputMode = "json_schema",
        default_model: str | None = None,
        budget_block_size: int = 1,
        deadline_seconds: float | None = None,
        budget_wait_seconds: float = DEFAULT_WAIT_SECONDS,
        on_wait: Callable[[str], None] | None = None,
        tokenizer: str | None = None,
        replay_current_try: bool = False,
    ) -> None:
        self._settings: dict[str, Any] = {
            "connection_id": connection_id,
            "prices": prices,
            "structured_output": structured_output,
            "default_model": default_model,
            "budget_block_size": budget_block_size,
            "deadline_seconds": deadline_seconds,
            "budget_wait_seconds": budget_wait_seconds,
            "on_wait": on_wait,
            "tokenizer": tokenizer,
            "replay_current_try": replay_current_try,
        }
        self.governor = governor
        self.transport = transport
        self.subject = subject
        self.connection_id = connection_id
        self.prices = prices
        self.structured_output = structured_output
        self.default_model = default_model
        self.deadline_seconds = deadline_seconds
        self.writer = StoreWriter(governor.audit)
        self._instance = governor.instance_digest(subject)
        self.budget = BudgetGate(
            governor,
            subject,
            record=self._record,
            block_size=budget_block_size,
            wait_seconds=budget_wait_seconds,
            on_wait=on_wait,
            instance=self._instance,
        )
        self._counter = token_counter(tokenizer)
        self._journals = {
            scope: ReplayJournal(governor.audit.engine, scope, digest=governor.digest)
            for scope in ("chat", "embed")
        }
        self._reconciled = False
        self._reconcile_lock = asyncio.Lock()
        self._budget_use_cache: tuple[float, dict[str, float]] | None = None
        self._route_recorded: set[tuple[str, str]] = set()
        # Per scope: key digests earlier tries completed, and those they left in doubt (with their try).
        self._earlier: dict[str, tuple[set[str], dict[str, int]]] = {}
        self._earlier_lock = asyncio.Lock()
        self._allowed_recorded: set[tuple[str, str, str]] = set()
        self.approvals = ApprovalGate(governor, subject)
        self._loop: _LoopThread | None = None
        self._loop_lock = threading.Lock()
        self.paid_requests = 0
        self.replayed_requests = 0
        # What this try paid for (replays excluded), for progress lines and summaries.
        self.paid_prompt_tokens = 0
        self.paid_completion_tokens = 0
        self.paid_cost = 0.0
        # Requests the response cache answered, and those it was asked about and could not answer.
        self.cache_hits = 0
        self.cache_misses = 0
        self._response_cache: ResponseCache | None = None

    def share(self, parts: int) -> GovernedClient:
        """A new client for the same task instance, settings and governance, with ``1/parts`` of the
        connection's rate limits: one of ``parts`` processes running a batch together (each needs its own
        client; they share the journal, the budget ledger and the audit chain through the store)."""
        return GovernedClient(self.governor, self.transport.share(parts), self.subject, **self._settings)

    # -- lifecycle --------------------------------------------------------------------------------------

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the client's event loop (where its connections live) and return its result."""
        return self.submit(coroutine).result()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coroutine`` on the client's event loop and return its future: code on another event
        loop awaits it with ``asyncio.wrap_future`` without holding a thread per call."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = _LoopThread()
            loop = self._loop
        return loop.submit(coroutine)

    async def aclose(self) -> None:
        """Settle open budget blocks and close the endpoint's connections."""
        await self.budget.close()
        await self.transport.aclose()

    def close(self) -> None:
        """Settle, flush the journal and audit writes, close connections and stop the client's loop."""
        try:
            if self._loop is not None:
                self._loop.run(self.aclose())
        finally:
            if self._loop is not None:
                self._loop.stop()
                self._loop = None
            self.writer.close()

    def __enter__(self) -> GovernedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sync facade -----------------------------------------------------------------------------------

    def chat(
        self, request: ChatRequest, *, prompt_version: str | None = None, item_key: str | None = None
    ) -> GovernedChatResult:
        """The governed call (see the module docstring); raises :mod:`governed_ai.core.errors` errors."""
        return self.run(self.achat(request, prompt_version=prompt_version, item_key=item_key))

    def embed(
        self, texts: Sequence[str], *, model: str, redact: bool = True, item_key: str | None = None
    ) -> GovernedEmbeddings:
        return self.run(self.aembed(texts, model=model, redact=redact, item_key=item_key))

    # -- chat ------------------------------------------------------------------------------------------

    def resolve_requested(self, model: str | None) -> str:
        """The model (or route alias) to ask for: the one given, else the connection's ``default_model``."""
        chosen = model or self.default_model
        if not chosen:
            raise ConfigurationError(
                f"No model given: set the operator's 'model' parameter, or 'default_model' in the extra "
                f"fields of connection '{self.connection_id}'."
            )
        return chosen

    async def achat(
        self,
        request: ChatRequest,
        *,
        prompt_version: str | None = None,
        item_key: str | None = None,
        check_reply: ReplyCheck | None = None,
    ) -> GovernedChatResult:
        requested = self.resolve_requested(request.model)
        candidates, budget_route = await self._candidates(self.governor.engine(), requested, prompt_version)
        tried: list[str] = []
        last: ModelUnavailable | None = None
        for model in candidates:
            try:
                await self.transport.ensure_served(model)
                result, decision, redactions, cache = await self._chat_with(
                    request, model, prompt_version, item_key, check_reply
                )
            except ModelUnavailable as unavailable:
                tried.append(model)
                last = unavailable
                continue
            return GovernedChatResult(
                result=result,
                rule=decision.rule,
                prompt_version=prompt_version,
                redactions=redactions,
                fallbacks_tried=tuple(tried),
                budget_route=budget_route,
                cache=cache,
            )
        assert last is not None  # candidates is never empty: an empty route is denied
        raise last

    async def _candidates(
        self, engine: PolicyEngine, requested: str, prompt_version: str | None
    ) -> tuple[list[str], dict[str, Any] | None]:
        """The models to try for ``requested`` (a role or a model), in order; denied when none is granted.

        A route with ``when_budget_above`` switches to its cheaper model once a budget that applies is used
        (spent and held) past the threshold; the switch is audited (``model.route``) once per task.
        """
        economy = False
        budget_route: dict[str, Any] | None = None
        route = engine.route_for(self.subject, requested)
        switch = route.when_budget_above if route is not None else None
        if route is not None and switch is not None:
            budget, used = await self._budget_use(switch.budget)
            economy = used >= switch.fraction
            if economy:
                budget_route = {
                    "requested": requested,
                    "from": route.model,
                    "to": switch.model,
                    "budget": budget,
                    "used": round(used, 4),
                    "threshold": switch.fraction,
                }
            if economy and (requested, switch.model) not in self._route_recorded:
                self._route_recorded.add((requested, switch.model))
                await self._record(
                    AuditRecord.for_subject(
                        self.subject,
                        action="model.route",
                        resource=f"{self.connection_id}/{switch.model}",
                        decision="n/a",
                        model=switch.model,
                        prompt_version=prompt_version,
                        outcome="switched",
                        extra=dict(budget_route or {}),
                    )
                )
        candidates = engine.resolve_model(self.subject, self.connection_id, requested, economy=economy)
        if not candidates:
            decision = engine.authorize_model(self.subject, self.connection_id, requested)
            await self._deny(decision, model=requested, prompt_version=prompt_version)
        return candidates, budget_route

    async def _budget_use(self, globs: Sequence[str] | None) -> tuple[str | None, float]:
        """The most used budget that applies (among ``globs``, if given): its name and the fraction of its
        limit spent or held. Read at most once a second per task."""
        now = time.monotonic()
        cached = self._budget_use_cache
        if cached is None or now - cached[0] > 1.0:
            keys = self.governor.budget_keys(self.subject)
            statuses = await asyncio.to_thread(self.governor.ledger.status, keys) if keys else []
            fractions: dict[str, float] = {}
            for status in statuses:
                used = 0.0
                if status.max_tokens:
                    used = max(used, (status.spent_tokens + status.reserved_tokens) / status.max_tokens)
                if status.max_cost_usd:
                    spent = status.spent_cost_usd + status.reserved_cost_usd
                    used = max(used, spent / status.max_cost_usd)
                fractions[status.budget] = used
            cached = self._budget_use_cache = (now, fractions)
        best: tuple[str | None, float] = (None, 0.0)
        for name, used in cached[1].items():
            if (globs is None or any(fnmatch.fnmatchcase(name, g) for g in globs)) and used >= best[1]:
                best = (name, used)
        return best

    async def _authorize(self, model: str, prompt_version: str | None) -> Decision:
        """The current policy's decision on ``model``; a denial is audited and raised, the first allow of
        each model under each policy version is audited once."""
        decision = self.governor.engine().authorize_model(self.subject, self.connection_id, model)
        if not decision.allowed:
            await self._deny(decision, model=model, prompt_version=prompt_version)
        seen = (model, decision.rule or "", decision.policy_digest)
        if seen not in self._allowed_recorded:
            self._allowed_recorded.add(seen)
            await self._record(
                self.governor.allow_record(self.subject, decision, model=model, prompt_version=prompt_version)
            )
        return decision

    async def _deny(self, decision: Decision, **fields: Any) -> None:
        record = self.governor.denial_record(self.subject, decision, **fields)
        await self._record(record)
        raise GovernanceDenied(
            record.error or "denied", action=decision.action, resource=decision.resource, rule=decision.rule
        )

    async def _chat_with(
        self,
        request: ChatRequest,
        model: str,
        prompt_version: str | None,
        item_key: str | None,
        check_reply: ReplyCheck | None,
    ) -> tuple[ChatResult, Decision, int, str | None]:
        decision = await self._authorize(model, prompt_version)
        cap = decision.max_tokens_per_call
        max_tokens = request.max_tokens if cap is None else min(request.max_tokens or cap, cap)
        governed = request.model_copy(
            update={"model": model, "max_tokens": max_tokens, "structured_output": self.structured_output}
        )
        driver = governed.driver(self.prices)
        redactions = 0
        resource = f"{self.connection_id}/{model}"
        reply: _RedactedReply | None = None  # the last paid reply as the policy lets it be kept
        cache_state: str | None = None  # hit: every request answered by the cache; miss: any paid for
        while (body := driver.next_request()) is not None:
            # The policy of now, before every request: a grant revoked mid-call stops the next one.
            decision = await self._authorize(model, prompt_version)
            body, found = self._redact_messages(body, decision)
            redactions += found
            key = self._step_key("chat", body, item_key)
            replay = await self._completed("chat", key)
            if replay is not None:
                completion = Completion.from_json(replay.result["completion"])
                driver.feed(completion, 0.0, replayed=True, verdict=replay.result.get("verdict"))
                self.replayed_requests += 1
                reply = None
                await self._record(self._replay_record(resource, model, decision, prompt_version, item_key))
                continue
            cache = self._cache_for(model, structured=request.output_schema is not None)
            to_store: tuple[str, CacheSettings] | None = None
            if cache is not None:
                stored_key = self._cache_key(cache, "chat", model, prompt_version, body)
                hit = await self._cache_lookup(stored_key, cache)
                if hit is not None:
                    cached = Completion.from_json(hit.result["completion"])
                    # Nothing was consumed: the result's usage and cost count only what this call paid.
                    cached = dataclasses.replace(cached, prompt_tokens=0, completion_tokens=0)
                    driver.feed(cached, 0.0, verdict=hit.result.get("verdict"))
                    reply = None  # stored redacted; redacted again below under the policy of now
                    cache_state = cache_state or "hit"
                    self.cache_hits += 1
                    await self._record(
                        self._replay_record(resource, model, decision, prompt_version, item_key,
                                            action="model.cache_hit", outcome="cache_hit",
                                            extra=self._cache_hit_extra(hit, stored_key), **_NOTHING_PAID)
                    )  # fmt: skip
                    continue
                self.cache_misses += 1
                cache_state = "miss"
                to_store = (stored_key, cache)
            reply = await self._paid_chat(
                driver, body, key, resource, model, decision, prompt_version, item_key, check_reply, to_store
            )
        result = driver.result()
        if decision.redaction.outputs:
            if reply is None:  # replayed: stored as redacted then; the policy of now may be stricter
                redacted, found = self.governor.redact_obj(
                    {"content": result.content, "output": result.output}, decision.redaction
                )
                reply = _RedactedReply(redacted["content"], redacted["output"], found)
            output, found = result.output, reply.found
            if output is not None:
                if reply.output is not None:  # the parsed structured output, redacted with the reply
                    output = reply.output
                else:  # an output the driver derived otherwise (native tool calls)
                    output, more = self.governor.redact_obj(output, decision.redaction)
                    found += more
            redactions += found
            result = result.model_copy(update={"content": reply.content, "output": output})
        return result, decision, redactions, cache_state

    async def _paid_chat(
        self,
        driver: Any,
        body: dict[str, Any],
        key: str,
        resource: str,
        model: str,
        decision: Decision,
        prompt_version: str | None,
        item_key: str | None,
        check_reply: ReplyCheck | None,
        to_store: tuple[str, CacheSettings] | None = None,
    ) -> _RedactedReply:
        """One paid request; returns its reply as the policy lets it be kept (redacted when it says so).
        ``to_store``: the response-cache key and settings when the reply may be stored for reuse."""
        await self._reconcile()
        prompt_estimate = count_messages(self._counter, body["messages"])
        await self._check_input_size(prompt_estimate, resource, model, decision, prompt_version, item_key)
        completion_cap = int(body.get("max_tokens") or DEFAULT_COMPLETION_RESERVE)
        worst_cost = self.prices.cost(model, prompt_estimate, completion_cap)
        await self._check_approval(model, resource, worst_cost)
        ticket = await self.budget.take(
            prompt_estimate + completion_cap,
            worst_cost,
            resource=resource,
            model=model,
            priced=self.prices.has_price(model),
        )
        label = f"chat {model}"
        await self.writer.write(
            steps=[
                StepClaim("chat", key, self._instance, label, self.subject.try_number, ticket.reservation_id)
            ]
        )
        started = time.perf_counter()
        try:
            sent = await self.transport.chat(
                body,
                deadline_seconds=self.deadline_seconds,
                estimated_tokens=prompt_estimate + completion_cap,
            )
        except ModelCallError as error:
            await self.budget.finish(ticket, 0, 0.0)
            message = self._error_text(error, decision)
            await self.writer.write(
                records=[
                    self._call_record(
                        resource,
                        model,
                        decision,
                        prompt_version,
                        item_key,
                        started,
                        error=message,
                        http_attempts=error.http_attempts,
                    )
                ],
                steps=[StepFailed("chat", key, message)],
            )
            raise
        completion = sent.result
        cost = self.prices.cost(model, completion.prompt_tokens, completion.completion_tokens)
        self._count_paid(completion.prompt_tokens, completion.completion_tokens, cost)
        verdict = driver.feed(completion, sent.seconds)
        kept = self._kept_reply(completion, verdict, decision)
        stored_completion, stored_verdict = kept.completion, kept.verdict
        content = None
        if decision.redaction.store_content:
            content = self._audit_content(body["messages"], completion, decision)
        record = self._call_record(
            resource, model, decision, prompt_version, item_key, started,
            prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
            cost_usd=cost, content=content, http_attempts=sent.http_attempts,
        )  # fmt: skip
        checked = list(check_reply(completion)) if check_reply is not None else []
        cached: list[CacheWrite] = []
        if to_store is not None and (verdict is None or verdict.get("parsed") is not None):  # valid only
            # What the cache keeps is always redacted, even where the policy lets this task see raw outputs.
            stored = kept
            if not decision.redaction.outputs:
                stored = self._kept_reply(completion, verdict, _redacting(decision))
            value = {"completion": stored.completion, "verdict": stored.verdict}
            cached.append(CacheWrite(to_store[0], "chat", resource, prompt_version, to_store[1].rule, value))
        await self.writer.write(
            cached=cached,
            records=[record, *checked],
            steps=[
                StepDone(
                    "chat",
                    key,
                    self._instance,
                    label,
                    self.subject.try_number,
                    ticket.reservation_id,
                    {"completion": stored_completion, "verdict": stored_verdict},
                    completion.prompt_tokens,
                    completion.completion_tokens,
                    cost,
                )
            ],
        )
        await self.budget.finish(ticket, completion.total_tokens, cost)
        await self._charge_if_in_doubt("chat", key, completion.total_tokens, completion.prompt_tokens, cost,
                                       resource, model, decision, prompt_version, item_key)  # fmt: skip
        return kept

    def _kept_reply(
        self, completion: Completion, verdict: Verdict | None, decision: Decision
    ) -> _RedactedReply:
        """A reply as the journal, XCom and the audit trail may keep it: with ``redact_outputs``, the text the
        model wrote (content, parsed output, tool-call arguments, the verdict's explanations) redacted, each
        once; the rest is numbers and the server's model name."""
        stored = completion.to_json()
        parsed = verdict.get("parsed") if verdict is not None else None
        if not decision.redaction.outputs:
            return _RedactedReply(completion.content, parsed, 0, stored, verdict)
        found = 0
        for field_name in ("content", "model", "finish_reason"):
            text = stored.get(field_name)
            if isinstance(text, str) and text:
                stored[field_name], count = self.governor.redact_text(text, decision.redaction)
                found += count
        if "tool_calls" in stored:
            stored["tool_calls"], count = self.governor.redact_obj(stored["tool_calls"], decision.redaction)
            found += count
        kept_verdict = verdict
        if verdict is not None:
            kept_verdict, count = self.governor.redact_obj(verdict, decision.redaction)
            found += count
            parsed = kept_verdict.get("parsed")
        return _RedactedReply(stored["content"], parsed, found, stored, kept_verdict)

    # -- embeddings ------------------------------------------------------------------------------------

    async def aembed(
        self, texts: Sequence[str], *, model: str, redact: bool = True, item_key: str | None = None
    ) -> GovernedEmbeddings:
        """Vectors for ``texts`` from the embedding endpoint, governed like a chat request.

        The policy must grant ``model`` on this connection; the texts are redacted before they leave
        (``redact=False`` is for texts the caller has already redacted with the same policy).
        """
        if not texts:
            raise ValueError("nothing to embed")
        decision = await self._authorize(model, None)
        redactions = 0
        inputs = list(texts)
        if redact and decision.redaction.prompts:
            inputs, redactions = self.governor.redact_obj(inputs, decision.redaction)
        resource = f"{self.connection_id}/{model}"
        body = {"model": model, "input": inputs}
        key = self._step_key("embed", body, item_key)
        replay = await self._completed("embed", key)
        if replay is not None:
            vectors = Embeddings.from_json(replay.result)
            self.replayed_requests += 1
            await self._record(
                self._replay_record(resource, model, decision, None, item_key, action="embedding.replay")
            )
            return GovernedEmbeddings(vectors.vectors, vectors.model, vectors.prompt_tokens, 0.0,
                                      decision.rule, redactions, True)  # fmt: skip
        cache = self._cache_for(model, structured=None)
        cached: list[CacheWrite] = []
        if cache is not None:
            stored_key = self._cache_key(cache, "embed", model, None, body)
            hit = await self._cache_lookup(stored_key, cache)
            if hit is not None:
                vectors = Embeddings.from_json(hit.result)
                self.cache_hits += 1
                await self._record(
                    self._replay_record(resource, model, decision, None, item_key,
                                        action="embedding.cache_hit", outcome="cache_hit", **_NOTHING_PAID,
                                        extra=self._cache_hit_extra(hit, stored_key, inputs=len(inputs)))
                )  # fmt: skip
                return GovernedEmbeddings(vectors.vectors, vectors.model, 0, 0.0, decision.rule, redactions,
                                          False, cached=True)  # fmt: skip
            self.cache_misses += 1
        await self._reconcile()
        estimate = sum(self._counter.count(text) for text in inputs)
        await self._check_input_size(estimate, resource, model, decision, None, item_key)
        worst_cost = self.prices.cost(model, estimate, 0)
        await self._check_approval(model, resource, worst_cost)
        ticket = await self.budget.take(
            estimate, worst_cost, resource=resource, model=model, priced=self.prices.has_price(model),
        )  # fmt: skip
        label = f"embed {model}"
        await self.writer.write(
            steps=[
                StepClaim("embed", key, self._instance, label, self.subject.try_number, ticket.reservation_id)
            ]
        )
        started = time.perf_counter()
        try:
            sent = await self.transport.embed(
                model, inputs, deadline_seconds=self.deadline_seconds, estimated_tokens=estimate
            )
        except ModelCallError as error:
            await self.budget.finish(ticket, 0, 0.0)
            message = self._error_text(error, decision)
            await self.writer.write(
                records=[
                    self._call_record(
                        resource,
                        model,
                        decision,
                        None,
                        item_key,
                        started,
                        error=message,
                        action="embedding.call",
                    )
                ],
                steps=[StepFailed("embed", key, message)],
            )
            raise
        result = sent.result
        cost = self.prices.cost(model, result.prompt_tokens, 0)
        self._count_paid(result.prompt_tokens, 0, cost)
        record = self._call_record(
            resource, model, decision, None, item_key, started, prompt_tokens=result.prompt_tokens,
            completion_tokens=0, cost_usd=cost, http_attempts=sent.http_attempts, action="embedding.call",
            inputs=len(inputs),
        )  # fmt: skip
        if cache is not None:
            cached.append(CacheWrite(stored_key, "embed", resource, None, cache.rule, result.to_json()))
        await self.writer.write(
            cached=cached,
            records=[record],
            steps=[
                StepDone(
                    "embed",
                    key,
                    self._instance,
                    label,
                    self.subject.try_number,
                    ticket.reservation_id,
                    result.to_json(),
                    result.prompt_tokens,
                    0,
                    cost,
                )
            ],
        )
        await self.budget.finish(ticket, result.prompt_tokens, cost)
        await self._charge_if_in_doubt("embed", key, result.prompt_tokens, result.prompt_tokens, cost,
                                       resource, model, decision, None, item_key)  # fmt: skip
        return GovernedEmbeddings(result.vectors, result.model, result.prompt_tokens, cost, decision.rule,
                                  redactions, False)  # fmt: skip

    def _count_paid(self, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        self.paid_requests += 1
        self.paid_prompt_tokens += prompt_tokens
        self.paid_completion_tokens += completion_tokens
        self.paid_cost += cost

    def describe_error(self, error: BaseException) -> str:
        """A failure as an item's reason: type and message, redacted as this task's policy says."""
        redaction = self.governor.engine().redaction_for(self.subject)
        text, _ = self.governor.redact_text(f"{type(error).__name__}: {error}"[:_MAX_ERROR], redaction)
        return text

    # -- budgets after a crash, and the input-size guard -------------------------------------------------

    async def _reconcile(self) -> None:
        """Once per try, before its first paid request: settle what a killed earlier try of this task
        instance left held, with what its completed requests really spent (the journal knows), and release
        the rest now instead of after the reservation TTL."""
        if self._reconciled:
            return
        async with self._reconcile_lock:
            if self._reconciled:
                return
            settled = await asyncio.to_thread(
                self.governor.ledger.settle_dead_holds,
                self._instance,
                living_holder=self.governor.holder(self.subject),
            )
            for reservation in settled:
                await self._record(
                    AuditRecord.for_subject(
                        self.subject,
                        action="budget.settle",
                        decision="n/a",
                        outcome="settled_for_dead_try",
                        extra={"holder": reservation.holder, "reserved_tokens": reservation.tokens},
                    )
                )
            self._reconciled = True

    async def _check_approval(self, model: str, resource: str, worst_cost: float) -> None:
        """Raise :class:`~governed_ai.core.errors.ApprovalRequired` (audited) before anything is reserved or
        sent when the policy wants a human to approve this call and none has for this task instance."""
        if not self.approvals.may_need("model"):
            return
        estimate = worst_cost if self.prices.has_price(model) else None  # no price: no estimate
        await asyncio.to_thread(
            self.approvals.check, "model", model, resource=resource, estimated_cost_usd=estimate
        )

    async def _check_input_size(
        self,
        prompt_tokens: int,
        resource: str,
        model: str,
        decision: Decision,
        prompt_version: str | None,
        item_key: str | None,
    ) -> None:
        limit = decision.max_input_tokens
        if limit is None or prompt_tokens <= limit:
            return
        how = "counted with the model's tokenizer" if self._counter.exact else "estimated"
        message = (
            f"the prompt is {prompt_tokens:,} tokens ({how}), over the policy's limit of {limit:,} input "
            f"tokens per call for model '{model}'. Nothing was reserved or sent. Shorten the input, or raise "
            "max_input_tokens on the model grant (or defaults.max_input_tokens_per_call) in the policy."
        )
        extra: dict[str, Any] = {"input_tokens": prompt_tokens, "limit": limit}
        if item_key is not None:
            extra["item"] = self.item_digest(item_key)
        await self._record(
            AuditRecord.for_subject(
                self.subject,
                action="model.input_limit",
                resource=resource,
                decision="deny",
                rule=decision.rule,
                model=model,
                prompt_version=prompt_version,
                outcome="denied",
                error=message,
                extra=extra,
            )
        )
        raise InputTooLarge(message)

    async def _charge_if_in_doubt(
        self,
        scope: str,
        key: str,
        tokens: int,
        prompt_tokens: int,
        cost: float,
        resource: str,
        model: str,
        decision: Decision,
        prompt_version: str | None,
        item_key: str | None,
    ) -> None:
        """A request an earlier try claimed and never completed was cut off by a kill; the provider most
        likely served (and billed) it. Its repeat just showed what it cost: charge that for the dead try too,
        so the ledger and the audit trail count what the provider counted."""
        earlier = self._earlier.get(scope)
        dead_try = earlier[1].pop(key, None) if earlier is not None else None  # charged once
        if dead_try is None:
            return
        keys = self.governor.budget_keys(self.subject)
        dead = self.subject.model_copy(update={"try_number": dead_try})
        if keys:
            await asyncio.to_thread(
                self.governor.ledger.charge, keys, tokens=tokens, cost_usd=cost,
                holder=self.governor.holder(dead), instance=self._instance,
            )  # fmt: skip
        extra: dict[str, Any] = {"in_doubt": True, "charged_by_try": self.subject.try_number}
        if item_key is not None:
            extra["item"] = self.item_digest(item_key)
        await self._record(
            AuditRecord.for_subject(
                dead,
                action="model.call" if scope == "chat" else "embedding.call",
                resource=resource,
                decision="allow",
                rule=decision.rule,
                model=model,
                prompt_version=prompt_version,
                prompt_tokens=prompt_tokens,
                completion_tokens=tokens - prompt_tokens,
                cost_usd=cost,
                outcome="in_doubt",
                extra=extra,
            )
        )

    # -- journal ----------------------------------------------------------------------------------------

    def _step_key(self, scope: str, body: dict[str, Any], item_key: str | None) -> str:
        material = orjson.dumps([scope, self._instance, item_key, body], option=orjson.OPT_SORT_KEYS)
        return self.governor.digest(material.decode("utf-8"))

    async def _completed(self, scope: str, key: str) -> JournalEntry | None:
        """The completed journal entry of ``key`` from an earlier try of this task instance, if any."""
        earlier = self._earlier.get(scope)
        if earlier is None:
            async with self._earlier_lock:
                earlier = self._earlier.get(scope)
                if earlier is None:
                    earlier = await asyncio.to_thread(
                        self._journals[scope].earlier_steps,
                        self._instance,
                        self.subject.try_number + (1 if self._settings["replay_current_try"] else 0),
                    )
                    self._earlier[scope] = earlier
        # Only what an earlier try paid for is replayed: the same question asked twice within one try (an
        # agent's repeated request, sampling at a temperature) is asked twice.
        if key not in earlier[0]:
            return None
        found = await asyncio.to_thread(self._journals[scope].lookup_many, [key])
        entry = found.get(key)
        if entry is None or entry.state is not JournalState.COMPLETED:
            return None
        return entry

    # -- records ---------------------------------------------------------------------------------------

    async def _record(self, record: AuditRecord) -> None:
        await self.writer.write(records=[record])

    def item_digest(self, item_key: str) -> str:
        """What the audit trail shows of a batch item's key: a digest, never the key itself."""
        return self.governor.digest(f"item|{self._instance}|{item_key}")[:16]

    def _call_record(
        self,
        resource: str,
        model: str,
        decision: Decision,
        prompt_version: str | None,
        item_key: str | None,
        started: float,
        *,
        error: str | None = None,
        http_attempts: int | None = None,
        action: str = "model.call",
        inputs: int | None = None,
        **fields: Any,
    ) -> AuditRecord:
        extra: dict[str, Any] = {}
        if item_key is not None:
            extra["item"] = self.item_digest(item_key)
        if http_attempts is not None:
            extra["http_attempts"] = http_attempts
        if inputs is not None:
            extra["inputs"] = inputs
        return AuditRecord.for_subject(
            self.subject,
            action=action,
            resource=resource,
            decision="allow",
            rule=decision.rule,
            model=model,
            prompt_version=prompt_version,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            outcome="ok" if error is None else "error",
            error=error,
            extra=extra,
            **fields,
        )

    def _replay_record(
        self,
        resource: str,
        model: str,
        decision: Decision,
        prompt_version: str | None,
        item_key: str | None,
        *,
        action: str = "model.replay",
        outcome: str = "replayed",
        extra: dict[str, Any] | None = None,
        **fields: Any,
    ) -> AuditRecord:
        extra = dict(extra or {})
        if item_key is not None:
            extra["item"] = self.item_digest(item_key)
        return AuditRecord.for_subject(
            self.subject,
            action=action,
            resource=resource,
            decision="allow",
            rule=decision.rule,
            model=model,
            prompt_version=prompt_version,
            outcome=outcome,
            extra=extra,
            **fields,
        )

    @staticmethod
    def _cache_hit_extra(hit: CachedReply, stored_key: str, **extra: Any) -> dict[str, Any]:
        """What a ``*.cache_hit`` record adds: which entry (a prefix of its keyed digest), when it was stored
        and by which rule's ``cache``."""
        return {**extra, "cache_key": stored_key[:16], "cached_at": hit.created_at.isoformat(),
                "cache_rule": hit.rule}  # fmt: skip

    # -- response cache ---------------------------------------------------------------------------------

    def _cache_for(self, model: str, *, structured: bool | None) -> CacheSettings | None:
        """The policy's response cache for ``model`` now, if it applies to this request (``structured``:
        whether the request has an output schema; None for embeddings, cached whenever the model is)."""
        settings = self.governor.engine().cache_for(self.subject, self.connection_id, model)
        if settings is None or (structured is False and settings.outputs == "structured"):
            return None
        return settings

    def _cache_key(
        self, cache: CacheSettings, scope: str, model: str, prompt_version: str | None, body: dict[str, Any]
    ) -> str:
        """The response-cache key of ``body`` (see :func:`~governed_ai.core.response_cache.cache_key`)."""
        connection = self.connection_id
        return cache_key(self.governor.digest, cache.rule, scope, connection, model, prompt_version, body)

    async def _cache_lookup(self, stored_key: str, settings: CacheSettings) -> CachedReply | None:
        if self._response_cache is None:
            self._response_cache = await asyncio.to_thread(
                ResponseCache, self.governor.audit.engine, clock=self.governor.clock
            )
        return await asyncio.to_thread(
            self._response_cache.lookup, stored_key, ttl_seconds=settings.ttl_seconds
        )

    def _error_text(self, error: BaseException, decision: Decision) -> str:
        text, _ = self.governor.redact_text(
            f"{type(error).__name__}: {error}"[:_MAX_ERROR], decision.redaction
        )
        return text

    def _redact_messages(self, body: dict[str, Any], decision: Decision) -> tuple[dict[str, Any], int]:
        """``body`` with its messages' contents redacted (roles and keys are fixed strings)."""
        if not decision.redaction.prompts:
            return body, 0
        found = 0
        messages: list[Message] = []
        for message in body["messages"]:
            content = message.get("content")
            if isinstance(content, str):
                content, count = self.governor.redact_text(content, decision.redaction)
            elif content is not None:  # structured content parts
                content, count = self.governor.redact_obj(content, decision.redaction)
            else:
                count = 0
            found += count
            redacted = {**message, "content": content}
            if message.get("tool_calls"):  # an earlier assistant turn, as the caller sends it back
                redacted["tool_calls"], count = self._redact_tool_call_arguments(
                    message["tool_calls"], decision
                )
                found += count
            messages.append(redacted)
        return {**body, "messages": messages}, found

    def _redact_tool_call_arguments(self, calls: Any, decision: Decision) -> tuple[Any, int]:
        """Tool calls of a message with their ``function.arguments`` text redacted; ids and names stay (the
        tool results refer to the ids)."""
        if not isinstance(calls, list):
            return calls, 0
        found = 0
        kept: list[Any] = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(function, dict) and isinstance(arguments, str) and arguments:
                arguments, count = self.governor.redact_text(arguments, decision.redaction)
                found += count
                call = {**call, "function": {**function, "arguments": arguments}}
            kept.append(call)
        return kept, found

    def _audit_content(self, messages: Sequence[Message], completion: Completion, decision: Decision) -> str:
        prompt = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in messages)
        text = f"{prompt}\n[assistant] {completion.content}"[:_MAX_AUDIT_CONTENT]
        # What the audit trail keeps is always redacted, even when the model or XCom saw raw text.
        redacted, _ = self.governor.redact_text(text, decision.redaction)
        return redacted


def item_digest(governor: Governor, subject: Subject, item_key: str) -> str:
    """What the audit trail shows of a batch item's key (16 hex of the deployment's keyed digest, scoped to
    the task instance): enough to follow one item through the trail, useless for guessing the key."""
    return governor.digest(f"item|{governor.instance_digest(subject)}|{item_key}")[:16]


def _redacting(decision: Decision) -> Decision:
    """``decision`` with output redaction on: what the response cache stores is always redacted."""
    return dataclasses.replace(decision, redaction=dataclasses.replace(decision.redaction, outputs=True))


def _message_chars(messages: Sequence[Message]) -> int:
    return sum(len(str(m.get("content") or "")) for m in messages)
