"""Budget for a batch, reserved in blocks of items instead of one ledger transaction per call.

Each block reserves the worst case of ``block_size`` items (prompt estimate plus max completion, times
repair attempts) in one transaction; when every item of the block has finished, the block is settled
with what those items really used, in one more. Two transactions per block instead of two per item keep
the ledger off the critical path, and a budget can still not be overspent: nothing runs unreserved.
Near the limit, a block that does not fit shrinks to what fits, down to a single item; when not even one
item fits, the batch stops cleanly (:class:`BudgetStop`) and the remaining items are reported as not run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from governed_ai.core.governor import GovernanceDenied, Governor
from governed_ai.core.ledger import Reservation
from governed_ai.core.subject import Subject


class BudgetStop(RuntimeError):
    """No budget left for even one more item."""


@dataclass
class _Block:
    reservation: Reservation | None
    slots: int
    taken: int = 0
    finished: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


@dataclass
class BlockTicket:
    """An item's share of a block; hand it back to :meth:`BudgetBlocks.finish` with the real usage."""

    block: _Block = field(repr=False)


class BudgetBlocks:
    """Hands out per-item slots of budget blocks: :meth:`take` before a call, :meth:`finish` after it,
    :meth:`close` at the end. ``item_tokens``/``item_cost_usd`` are one item's worst case."""

    def __init__(
        self,
        governor: Governor,
        subject: Subject,
        *,
        item_tokens: int,
        item_cost_usd: float,
        resource: str,
        model: str,
        block_size: int = 16,
    ) -> None:
        self._governor = governor
        self._subject = subject
        self._item_tokens = item_tokens
        self._item_cost = item_cost_usd
        self._resource = resource
        self._model = model
        self._block_size = max(1, block_size)
        self._current: _Block | None = None
        self._lock = asyncio.Lock()
        self.stopped: str | None = None
        self.reservations = 0

    async def take(self) -> BlockTicket:
        """A slot in the current block, reserving a new block when it is full. Raises BudgetStop."""
        async with self._lock:
            if self.stopped:
                raise BudgetStop(self.stopped)
            block = self._current
            if block is None or block.taken >= block.slots:
                block = await asyncio.to_thread(self._reserve_block)
                self._current = block
            block.taken += 1
            return BlockTicket(block)

    def _fitting_size(self) -> int:
        """How many items' worst case still fits every budget (read-only), capped at the block size.

        Sizing the block from the ledger first means a batch near its limit does not leave a trail of
        ``budget.deny`` audit records for block sizes it merely tried; a real denial is recorded once.
        """
        keys = self._governor.budget_keys(self._subject)
        if not keys:
            return self._block_size
        fits = self._block_size
        for status in self._governor.ledger.status(keys):
            for remaining, per_item in (
                (status.remaining_tokens, self._item_tokens),
                (status.remaining_cost_usd, self._item_cost),
            ):
                if remaining is not None and per_item > 0:
                    fits = min(fits, int(remaining // per_item))
        return max(1, fits)  # a block of one that does not fit is denied (and audited) by reserve()

    def _reserve_block(self) -> _Block:
        size = self._fitting_size()
        while True:
            try:
                reservation = self._governor.reserve(
                    self._subject,
                    tokens=self._item_tokens * size,
                    cost_usd=self._item_cost * size,
                    resource=self._resource,
                    model=self._model,
                )
            except GovernanceDenied as denied:
                if size == 1:
                    self.stopped = str(denied)
                    raise BudgetStop(self.stopped) from None
                size = max(1, size // 4)  # another holder took budget since the check: try smaller
                continue
            if reservation is not None:  # None: no budget applies to this task
                self.reservations += 1
            return _Block(reservation=reservation, slots=size)

    async def finish(self, ticket: BlockTicket, tokens: int, cost_usd: float) -> None:
        """Record an item's real usage; settles the block once all its items are done."""
        block = ticket.block
        block.finished += 1
        block.tokens += tokens
        block.cost_usd += cost_usd
        if block.finished == block.taken and (block.taken == block.slots or block is not self._current):
            await asyncio.to_thread(self._settle, block)

    async def close(self) -> None:
        """Settle a partly used last block (its unused slots are released)."""
        block = self._current
        self._current = None
        if block is not None and block.finished == block.taken and block.taken < block.slots:
            await asyncio.to_thread(self._settle, block)

    def _settle(self, block: _Block) -> None:
        if block.reservation is not None:
            self._governor.ledger.settle(block.reservation.id, tokens=block.tokens, cost_usd=block.cost_usd)
            block.reservation = None
