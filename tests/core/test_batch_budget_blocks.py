"""BudgetBlocks with a real Governor, BudgetLedger and AuditStore, on SQLite and a real PostgreSQL.

Items are simulated (take a slot, report a usage, finish): what is checked is the ledger, which must
never be overspent, must end with exactly the items' usage settled and nothing held, and must see two
transactions per block rather than per item.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from governed_ai.core.audit import AuditStore
from governed_ai.core.batch.budget_blocks import BudgetBlocks, BudgetStop
from governed_ai.core.governor import Governor
from governed_ai.core.ledger import BudgetLedger, BudgetStatus
from governed_ai.core.policy import PolicyProvider
from governed_ai.core.subject import Subject

SUBJECT = Subject(dag_id="batch_dag", task_id="classify", run_id="run-1")
ITEM_TOKENS = 100  # one item's worst case (prompt estimate + max completion)


def policy(limit: str) -> str:
    return f"""
version: 1
rules:
  - name: batch
    match: {{dag_id: batch_dag}}
    models: [{{connection: llm, model: m}}]
budgets:
  - {{name: batch-run, scope: dag, match: {{dag_id: batch_dag}}, period: run, {limit}}}
"""


@pytest.fixture
def governor_for(store_engine: Engine) -> Callable[[str], Governor]:
    def build(policy_text: str) -> Governor:
        return Governor(
            policy=PolicyProvider(text=policy_text),
            ledger=BudgetLedger(store_engine),
            audit=AuditStore(store_engine),
        )

    return build


def blocks(governor: Governor, *, block_size: int, item_cost_usd: float = 0.0) -> BudgetBlocks:
    return BudgetBlocks(
        governor,
        SUBJECT,
        item_tokens=ITEM_TOKENS,
        item_cost_usd=item_cost_usd,
        resource="llm/m",
        model="m",
        block_size=block_size,
    )


def status(governor: Governor) -> BudgetStatus:
    (only,) = governor.ledger.status()
    return only


def denials(governor: Governor) -> int:
    return len(governor.audit.query(action="budget.deny", limit=None))


def test_sequential_items_never_overspend_blocks_shrink_and_the_batch_stops_cleanly(governor_for):
    limit = 1_000
    governor = governor_for(policy(f"max_tokens: {limit}"))
    budget = blocks(governor, block_size=4)
    usage = random.Random(3)
    spent_by_items = 0
    block_sizes: list[int] = []

    async def run() -> int:
        nonlocal spent_by_items
        ran = 0
        while True:
            try:
                ticket = await budget.take()
            except BudgetStop:
                return ran
            if not block_sizes or ticket.block is not last_block[0]:
                block_sizes.append(ticket.block.slots)
                last_block[0] = ticket.block
            now = status(governor)
            assert now.spent_tokens + now.reserved_tokens <= limit  # holds included: never over the limit
            used = usage.randint(20, ITEM_TOKENS)  # real usage never exceeds the worst case
            spent_by_items += used
            await budget.finish(ticket, used, 0.0)
            ran += 1

    last_block: list[object] = [None]
    ran = asyncio.run(run())
    asyncio.run(budget.close())

    final = status(governor)
    assert final.spent_tokens == spent_by_items <= limit
    assert final.reserved_tokens == 0
    assert limit - final.spent_tokens < ITEM_TOKENS  # it stopped because not even one more item fitted
    assert ran == sum(block_sizes)
    assert block_sizes[0] == 4 and block_sizes[-1] == 1  # full blocks first, then smaller ones near the limit
    assert block_sizes == sorted(block_sizes, reverse=True)
    assert budget.reservations == len(block_sizes)
    assert budget.stopped is not None and "Budget exhausted" in budget.stopped
    assert denials(governor) == 1  # the one real denial, not one per block size tried


def test_concurrent_items_never_overspend_and_the_ledger_ends_at_their_total(governor_for):
    limit = 5_000
    governor = governor_for(policy(f"max_tokens: {limit}"))
    budget = blocks(governor, block_size=8)
    rng = random.Random(11)
    used_by_item: list[int] = []
    peaks: list[int] = []

    async def item() -> None:
        try:
            ticket = await budget.take()
        except BudgetStop:
            return
        await asyncio.sleep(rng.random() / 1000)  # items finish out of order, across blocks
        now = await asyncio.to_thread(status, governor)
        peaks.append(now.spent_tokens + now.reserved_tokens)
        used = rng.randint(1, ITEM_TOKENS)
        used_by_item.append(used)
        await budget.finish(ticket, used, 0.0)

    async def run() -> None:
        sem = asyncio.Semaphore(12)

        async def bounded() -> None:
            async with sem:
                await item()

        await asyncio.gather(*(bounded() for _ in range(200)))
        await budget.close()

    asyncio.run(run())
    final = status(governor)
    assert max(peaks) <= limit
    assert final.spent_tokens == sum(used_by_item)
    assert final.reserved_tokens == 0
    assert budget.stopped is not None  # 200 items x 100 worst case cannot fit in 5,000
    assert len(used_by_item) < 200
    assert budget.reservations < len(used_by_item) / 2  # blocks, not one transaction per item


def test_a_budget_too_small_for_one_item_stops_before_any_call_and_stays_stopped(governor_for):
    governor = governor_for(policy(f"max_tokens: {ITEM_TOKENS - 1}"))
    budget = blocks(governor, block_size=16)

    with pytest.raises(BudgetStop, match="Budget exhausted.*batch-run"):
        asyncio.run(budget.take())
    with pytest.raises(BudgetStop):
        asyncio.run(budget.take())  # decided: no second trip to the ledger

    assert denials(governor) == 1
    assert budget.reservations == 0
    assert status(governor).reserved_tokens == 0


def test_a_block_is_held_until_its_last_item_finishes_then_settled_with_real_usage(governor_for):
    governor = governor_for(policy("max_tokens: 100000"))
    budget = blocks(governor, block_size=4)

    async def run() -> None:
        tickets = [await budget.take() for _ in range(4)]
        for ticket in tickets[:3]:
            await budget.finish(ticket, 10, 0.0)
        held = status(governor)
        assert (held.reserved_tokens, held.spent_tokens) == (4 * ITEM_TOKENS, 0)
        await budget.finish(tickets[3], 15, 0.0)

    asyncio.run(run())
    settled = status(governor)
    assert (settled.reserved_tokens, settled.spent_tokens) == (0, 45)
    assert budget.reservations == 1


def test_close_settles_a_partly_used_last_block_and_frees_its_unused_slots(governor_for):
    governor = governor_for(policy("max_tokens: 100000"))
    budget = blocks(governor, block_size=16)

    async def run() -> None:
        for used in (30, 12, 7):
            await budget.finish(await budget.take(), used, 0.0)
        assert status(governor).reserved_tokens == 16 * ITEM_TOKENS  # still held: the block is not full
        await budget.close()

    asyncio.run(run())
    final = status(governor)
    assert (final.reserved_tokens, final.spent_tokens) == (0, 49)


def test_cost_limits_shrink_blocks_too(governor_for):
    governor = governor_for(policy("max_cost_usd: 0.001"))
    budget = blocks(governor, block_size=16, item_cost_usd=0.0001)  # ten items' worst case fits

    async def run() -> int:
        ran = 0
        while True:
            try:
                ticket = await budget.take()
            except BudgetStop:
                return ran
            await budget.finish(ticket, 50, 0.0001)  # every item really costs its worst case
            ran += 1

    ran = asyncio.run(run())
    asyncio.run(budget.close())
    final = status(governor)
    assert ran == 10
    assert final.spent_cost_usd == pytest.approx(0.001)
    assert final.reserved_cost_usd == 0


def test_without_a_budget_nothing_is_reserved(governor_for):
    governor = governor_for(
        policy("max_tokens: 1000").replace("dag_id: batch_dag}, period", "dag_id: other}, period")
    )
    budget = blocks(governor, block_size=4)

    async def run() -> None:
        for _ in range(10):
            await budget.finish(await budget.take(), 5, 0.0)
        await budget.close()

    asyncio.run(run())
    assert budget.reservations == 0
    assert governor.ledger.status() == []
