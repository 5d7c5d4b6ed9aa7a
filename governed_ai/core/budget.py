"""Budget for a task's calls: reserved before anything is sent, settled with what was really used.

A :class:`BudgetGate` serves one task (one subject). Before each paid request it takes the request's worst
case (prompt estimate plus max completion) out of a *block*: a reservation in the ledger for the worst case
of ``block_size`` such requests, made in one transaction. When every request of a block has finished, the
block is settled with what they really used, in one more. A single call uses blocks of one; a batch of
thousands of calls uses blocks of 16, which keeps the ledger off the critical path while a budget still
cannot be overspent: nothing is sent unreserved.

The budgets that apply are looked up again for every request (a cached policy decision): when the policy
changes them, or a day or month rolls over, the current block is closed and the next request reserves on
the budgets that apply now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from governed_ai.core.audit import AuditRecord
from governed_ai.core.errors import BudgetExhausted
from governed_ai.core.governor import Governor
from governed_ai.core.ledger import BudgetExceeded, BudgetKey, Reservation
from governed_ai.core.subject import Subject


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

    :param record: how a budget denial is audited (the client's writer), awaited before the denial is
        raised.
    """

    def __init__(
        self,
        governor: Governor,
        subject: Subject,
        *,
        record: Callable[[AuditRecord], Awaitable[None]],
        block_size: int = 1,
    ) -> None:
        self._governor = governor
        self._subject = subject
        self._record = record
        self._block_size = max(1, block_size)
        self._current: _Block | None = None
        self._lock = asyncio.Lock()
        self.reservations = 0

    async def take(self, tokens: int, cost_usd: float, *, resource: str, model: str) -> BudgetTicket:
        """A share of ``tokens``/``cost_usd`` in the current block, reserving a new block when needed.

        Raises :class:`BudgetExhausted` (audited) when not even this one request fits.
        """
        async with self._lock:
            keys = tuple(self._governor.budget_keys(self._subject))
            block = self._current
            if block is not None and (
                block.keys != keys or block.tokens_left < tokens or block.cost_left < cost_usd - 1e-12
            ):
                await self._close(block)
                block = None
            if block is None:
                try:
                    block = await asyncio.to_thread(self._reserve_block, keys, tokens, cost_usd)
                except BudgetExceeded as exceeded:
                    raise await self._deny(exceeded, resource, model) from None
                self._current = block
            block.takers += 1
            block.tokens_left -= tokens
            block.cost_left -= cost_usd
            return BudgetTicket(block)

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
                )
            except BudgetExceeded:
                if size == 1:
                    raise
                size = max(1, size // 4)  # another holder took budget since the check: try smaller
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
        return max(1, fits)  # a block of one that does not fit is denied (and audited) by reserve()

    async def _deny(self, exceeded: BudgetExceeded, resource: str, model: str) -> BudgetExhausted:
        await self._record(
            AuditRecord.for_subject(
                self._subject,
                action="budget.deny",
                resource=resource,
                decision="deny",
                rule=exceeded.budget,
                model=model,
                outcome="denied",
                error=str(exceeded),
            )
        )
        return BudgetExhausted(
            f"Budget exhausted: {exceeded}. Raise the budget's limit in the policy, or wait until it resets.",
            action="budget",
            resource=resource,
            rule=exceeded.budget,
        )

    async def finish(self, ticket: BudgetTicket, tokens: int, cost_usd: float) -> None:
        """Record a request's real usage; settles its block once the block is closed and all are done."""
        block = ticket.block
        block.finished += 1
        block.tokens_used += tokens
        block.cost_used += cost_usd
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
