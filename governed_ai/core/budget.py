"""Budget for a task's calls: reserved before anything is sent, settled with what was really used.

A :class:`BudgetGate` serves one task (one subject). Before each paid request it takes the request's worst
case (prompt estimate plus max completion) out of a *block*: a reservation in the ledger for the worst case
of ``block_size`` such requests, made in one transaction. When every request of a block has finished, the
block is settled with what they really used, in one more. A single call uses blocks of one; a batch of
thousands of calls uses blocks of 16, which keeps the ledger off the critical path while a budget still
cannot be overspent: nothing is sent unreserved.

Near the limit a block shrinks to what fits, down to one request. When even one does not fit, the gate
asks whether waiting can help: if the budget's limit minus what is *spent* would fit it, the room is only
held (by this task's requests still in flight, or by other tasks), so it waits, bounded, for holds to
settle or expire, logging what it waits for. Only when the room cannot fit one request even after every
hold has cleared is the budget exhausted for this task, with a message that says what was spent, what is
held and by whom, the limit, and what to do.

The budgets that apply are looked up again for every request (a cached policy decision): when the policy
changes them, or a day or month rolls over, the current block is closed and the next request reserves on
the budgets that apply now.

A model without a price would cost $0 and never reach a ``max_cost_usd`` limit, so the gate refuses a
request for an unpriced model while a budget with a cost limit applies, unless that budget's
``allow_unpriced_models`` lists the model (then it counts in tokens only). Every paid request (chat,
structured-output repairs, agent steps, batch items, embeddings) takes its budget here, so this is the one
place the rule is enforced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from governed_ai.core.audit import AuditRecord
from governed_ai.core.errors import BudgetExhausted, UnpricedModel
from governed_ai.core.governor import Governor
from governed_ai.core.ledger import BudgetExceeded, BudgetKey, BudgetStatus, Hold, Reservation
from governed_ai.core.subject import Subject

# How long a request waits for held budget to be settled or to expire, by default: the longest a dead
# holder can keep it is the reservation TTL (600 s unless the policy says otherwise).
DEFAULT_WAIT_SECONDS = 600.0
_PROGRESS_EVERY_SECONDS = 10.0


@dataclass
class _Block:
    reservation: Reservation | None  # None: no budget applies to this task
    keys: tuple[BudgetKey, ...]
    tokens_left: int
    cost_left: float
    takers: int = 0
    finished: int = 0
    closed: bool = False
    settled: bool = False
    tokens_used: int = 0
    cost_used: float = 0.0


@dataclass(frozen=True)
class BudgetTicket:
    """One request's share of a block; hand it back to :meth:`BudgetGate.finish` with the real usage."""

    block: _Block = field(repr=False)

    @property
    def reservation_id(self) -> str | None:
        return self.block.reservation.id if self.block.reservation is not None else None


class BudgetGate:
    """Hands out per-request shares of budget blocks for one subject.

    :param record: how a budget denial is audited (the client's writer), awaited before it is raised.
    :param wait_seconds: how long a request may wait for held budget to clear before the gate gives up.
    :param on_wait: called with a progress line while waiting (the task log).
    :param instance: digest of the task instance, stored on reservations so that its next try can settle
        what a killed try left held.
    """

    def __init__(
        self,
        governor: Governor,
        subject: Subject,
        *,
        record: Callable[[AuditRecord], Awaitable[None]],
        block_size: int = 1,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
        on_wait: Callable[[str], None] | None = None,
        instance: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._governor = governor
        self._subject = subject
        self._record = record
        self._block_size = max(1, block_size)
        self._wait_seconds = wait_seconds
        self._on_wait = on_wait
        self._instance = instance
        self._clock = clock
        self._current: _Block | None = None
        self._lock = asyncio.Lock()
        self.reservations = 0
        self.waited_seconds = 0.0

    async def take(
        self, tokens: int, cost_usd: float, *, resource: str, model: str, priced: bool = True
    ) -> BudgetTicket:
        """A share of ``tokens``/``cost_usd`` in the current block, reserving a new block when needed.

        Raises :class:`BudgetExhausted` (audited) when not even this one request can fit, even after every
        hold on the budget has cleared; :class:`UnpricedModel` (audited) when ``model`` has no price
        (``priced=False``) and a budget with a cost limit that does not allow it unpriced applies.
        """
        if not priced:
            await self._refuse_if_cost_uncountable(resource, model)
        async with self._lock:
            keys = tuple(self._governor.budget_keys(self._subject))
            block = self._current
            if block is not None and (
                block.keys != keys or block.tokens_left < tokens or block.cost_left < cost_usd - 1e-12
            ):
                await self._close(block)
                block = None
            if block is None:
                block = await self._reserve_or_wait(keys, tokens, cost_usd, resource, model)
                self._current = block
            block.takers += 1
            block.tokens_left -= tokens
            block.cost_left -= cost_usd
            return BudgetTicket(block)

    async def _refuse_if_cost_uncountable(self, resource: str, model: str) -> None:
        budgets = self._governor.engine().budgets_requiring_price(self._subject, model)
        if not budgets:
            return
        names = ", ".join(f"'{name}'" for name in budgets)
        message = (
            f"Model '{model}' has no price, and budget(s) {names} limit cost (max_cost_usd): its calls "
            f"would count as $0 and the limit could never stop them, so nothing was reserved or sent. Add a "
            f"price for '{model}' to the LLM connection's 'prices' extra (a free model gets "
            '{"input_per_1m_tokens": 0, "output_per_1m_tokens": 0}), or, to count it in tokens only, add '
            f"'{model}' (or a glob) to allow_unpriced_models of budget {names} in the policy."
        )
        await self._record(
            AuditRecord.for_subject(
                self._subject,
                action="budget.unpriced",
                resource=resource,
                decision="deny",
                rule=budgets[0],
                model=model,
                outcome="denied",
                error=message,
                extra={"budgets": budgets},
            )
        )
        raise UnpricedModel(message, action="budget.unpriced", resource=resource, rule=budgets[0])

    async def _reserve_or_wait(
        self, keys: tuple[BudgetKey, ...], tokens: int, cost_usd: float, resource: str, model: str
    ) -> _Block:
        started = self._clock()
        next_report = started + _PROGRESS_EVERY_SECONDS
        pause = 0.05
        while True:
            try:
                return await asyncio.to_thread(self._reserve_block, keys, tokens, cost_usd)
            except BudgetExceeded as exceeded:
                statuses = await asyncio.to_thread(self._governor.ledger.status, keys)
                if not _fits_once_holds_clear(statuses, tokens, cost_usd):
                    denial = await self._deny(exceeded, keys, statuses, tokens, cost_usd, resource, model)
                    raise denial from None
                waited = self._clock() - started
                if waited >= self._wait_seconds:
                    raise await self._deny(
                        exceeded, keys, statuses, tokens, cost_usd, resource, model, waited=waited
                    ) from None
                if self._on_wait is not None and self._clock() >= next_report:
                    next_report = self._clock() + _PROGRESS_EVERY_SECONDS
                    self._on_wait(
                        f"waiting {waited:.0f} s for held budget to clear: {_describe(statuses)}; this task "
                        f"needs {tokens:,} tokens for its next request"
                    )
                await asyncio.sleep(min(pause, max(0.0, self._wait_seconds - waited)))
                pause = min(pause * 2, 1.0)
                self.waited_seconds = self._clock() - started

    def _reserve_block(self, keys: tuple[BudgetKey, ...], tokens: int, cost_usd: float) -> _Block:
        if not keys:
            return _Block(None, keys, tokens * self._block_size, cost_usd * self._block_size)
        size = self._fitting_size(keys, tokens, cost_usd)
        ledger = self._governor.ledger
        while True:
            try:
                reservation = ledger.reserve(
                    keys,
                    tokens=tokens * size,
                    cost_usd=cost_usd * size,
                    holder=self._governor.holder(self._subject),
                    ttl_seconds=self._governor.engine().defaults.reservation_ttl_seconds,
                    instance=self._instance,
                )
            except BudgetExceeded:
                if size == 1:
                    raise
                size = max(1, size // 4)  # another holder took budget since the check: try smaller
                continue
            self.reservations += 1
            return _Block(reservation, keys, tokens * size, cost_usd * size)

    def _fitting_size(self, keys: tuple[BudgetKey, ...], tokens: int, cost_usd: float) -> int:
        """How many requests of this size still fit every budget (read-only), capped at the block size.

        Sizing the block from the ledger first means a task near its limit does not leave a trail of
        ``budget.deny`` records for block sizes it merely tried; a real denial is recorded once.
        """
        fits = self._block_size
        for status in self._governor.ledger.status(keys):
            for remaining, per_request in (
                (status.remaining_tokens, tokens),
                (status.remaining_cost_usd, cost_usd),
            ):
                if remaining is not None and per_request > 0:
                    fits = min(fits, int(remaining // per_request))
        return max(1, fits)  # a block of one that does not fit is refused by reserve()

    async def _deny(
        self,
        exceeded: BudgetExceeded,
        keys: Sequence[BudgetKey],
        statuses: Sequence[BudgetStatus],
        tokens: int,
        cost_usd: float,
        resource: str,
        model: str,
        *,
        waited: float | None = None,
    ) -> BudgetExhausted:
        holds = await asyncio.to_thread(self._governor.ledger.holds, keys)
        message = stop_message(exceeded, statuses, holds, tokens, cost_usd, waited=waited)
        await self._record(
            AuditRecord.for_subject(
                self._subject,
                action="budget.deny",
                resource=resource,
                decision="deny",
                rule=exceeded.budget,
                model=model,
                outcome="denied",
                error=message,
            )
        )
        return BudgetExhausted(message, action="budget", resource=resource, rule=exceeded.budget)

    async def finish(self, ticket: BudgetTicket, tokens: int, cost_usd: float) -> None:
        """Record a request's real usage; settles its block once the block is closed and all are done."""
        block = ticket.block
        block.finished += 1
        block.tokens_used += tokens
        block.cost_used += cost_usd
        if block.tokens_left <= 0 and block.cost_left <= 1e-12:
            block.closed = True  # nothing left to hand out: settle as soon as its requests are done
        if block.closed and block.finished == block.takers:
            await asyncio.to_thread(self._settle, block)

    async def _close(self, block: _Block) -> None:
        block.closed = True
        if block.finished == block.takers:
            await asyncio.to_thread(self._settle, block)

    async def close(self) -> None:
        """Close the current block (its unused part is released once its requests have finished)."""
        async with self._lock:
            if self._current is not None:
                await self._close(self._current)
                self._current = None

    def _settle(self, block: _Block) -> None:
        if block.settled:
            return
        block.settled = True
        if block.reservation is not None:
            self._governor.ledger.settle(
                block.reservation.id, tokens=block.tokens_used, cost_usd=block.cost_used
            )


def _fits_once_holds_clear(statuses: Sequence[BudgetStatus], tokens: int, cost_usd: float) -> bool:
    """Whether the request would fit every budget if nothing were held (only spend counted)."""
    for status in statuses:
        if status.max_tokens is not None and status.spent_tokens + tokens > status.max_tokens:
            return False
        if status.max_cost_usd is not None and status.spent_cost_usd + cost_usd > status.max_cost_usd + 1e-9:
            return False
    return True


def _describe(statuses: Sequence[BudgetStatus]) -> str:
    parts = []
    for s in statuses:
        if s.max_tokens is not None:
            parts.append(
                f"budget '{s.budget}': {s.spent_tokens:,} of {s.max_tokens:,} tokens spent, "
                f"{s.reserved_tokens:,} held"
            )
        if s.max_cost_usd is not None:
            parts.append(
                f"budget '{s.budget}': ${s.spent_cost_usd:.6f} of ${s.max_cost_usd:.2f} spent, "
                f"${s.reserved_cost_usd:.6f} held"
            )
    return "; ".join(parts)


def stop_message(
    exceeded: BudgetExceeded,
    statuses: Sequence[BudgetStatus],
    holds: Sequence[Hold],
    tokens: int,
    cost_usd: float,
    *,
    waited: float | None = None,
) -> str:
    """Why a task stops on a budget: spent, held and by whom, the limit, and what to do."""
    kind = exceeded.period_kind or "period"
    window = f"{kind} {exceeded.period}"
    held_by = ", ".join(f"{h.holder} ({h.tokens:,} tokens)" for h in holds[:3]) or "nobody"
    if len(holds) > 3:
        held_by += f" and {len(holds) - 3} more"
    need = f"{tokens:,} tokens" + (f" / ${cost_usd:.6f}" if cost_usd else "")
    why = (
        f"waited {waited:.0f} s and the held budget did not clear"
        if waited is not None
        else "it would not fit even once every hold has cleared"
    )
    reset = f" It resets at {exceeded.resets_at:%Y-%m-%dT%H:%MZ}." if exceeded.resets_at is not None else ""
    return (
        f"Budget exhausted: budget '{exceeded.budget}' ({window}): {_describe(statuses)}; held by {held_by}. "
        f"The next request needs up to {need}, and {why}.{reset} Raise the budget's limit in the policy, "
        "run the rest after it resets (a BudgetSensor waits for that), or lower max_tokens."
    )


def room_for(
    governor: Governor,
    subject: Subject,
    *,
    tokens: int,
    cost_usd: float = 0.0,
    budgets: Sequence[str] | None = None,
) -> tuple[bool, str]:
    """Whether every budget that applies to ``subject`` (or those named in ``budgets``) has room, now,
    for ``tokens``/``cost_usd`` on top of what is spent and held; with a line saying why (for sensors)."""
    keys = [k for k in governor.budget_keys(subject) if budgets is None or k.budget in budgets]
    if budgets is not None:
        missing = set(budgets) - {k.budget for k in keys}
        if missing:
            return False, f"budget(s) {sorted(missing)} do not apply to this task under the current policy"
    if not keys:
        return True, "no budget applies to this task"
    short = []
    for status in governor.ledger.status(keys):
        if status.remaining_tokens is not None and status.remaining_tokens < tokens:
            short.append(f"'{status.budget}' ({status.period}) has {status.remaining_tokens:,} tokens left")
        if status.remaining_cost_usd is not None and status.remaining_cost_usd < cost_usd:
            short.append(f"'{status.budget}' ({status.period}) has ${status.remaining_cost_usd:.6f} left")
    if short:
        return False, f"waiting for room for {tokens:,} tokens: " + "; ".join(short)
    periods = ", ".join(f"'{k.budget}' ({k.period})" for k in keys)
    return True, f"budget has room for {tokens:,} tokens: {periods}"
