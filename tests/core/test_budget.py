"""BudgetGate with a real Governor, BudgetLedger and AuditStore, on SQLite and a real PostgreSQL.

Requests are simulated (take a share, report a usage, finish): what is checked is the ledger, which must
never be overspent, must end with exactly the requests' usage settled and nothing held, and must see two
transactions per block rather than per request.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from governed_ai.core.audit import AuditRecord
from governed_ai.core.budget import BudgetGate
from governed_ai.core.errors import BudgetExhausted
from governed_ai.core.governor import FixedPolicy, Governor
from governed_ai.core.ledger import BudgetLedger, BudgetStatus
from governed_ai.core.policy import PolicyProvider, engine_from_text
from governed_ai.core.subject import Subject
from tests.audit_support import keyed_audit_store

SUBJECT = Subject(dag_id="batch_dag", task_id="classify", run_id="run-1")
REQUEST_TOKENS = 100  # one request's worst case (prompt estimate + max completion)


def policy(limit: str, dag: str = "batch_dag") -> str:
    return f"""
version: 1
rules:
  - name: batch
    match: {{dag_id: batch_dag}}
    models: [{{connection: llm, model: m}}]
budgets:
  - {{name: batch-run, scope: dag, match: {{dag_id: {dag}}}, period: run, {limit}}}
"""


@pytest.fixture
def governor_for(store_engine: Engine) -> Callable[[str], Governor]:
    def build(policy_text: str) -> Governor:
        return Governor(
            policy=PolicyProvider(text=policy_text),
            ledger=BudgetLedger(store_engine),
            audit=keyed_audit_store(store_engine),
        )

    return build


def gate(governor: Governor, *, block_size: int) -> BudgetGate:
    async def record(audit_record: AuditRecord) -> None:
        governor.record(audit_record)

    return BudgetGate(governor, SUBJECT, record=record, block_size=block_size)


async def take(budget: BudgetGate, tokens: int = REQUEST_TOKENS, cost: float = 0.0):  # type: ignore[no-untyped-def]
    return await budget.take(tokens, cost, resource="llm/m", model="m")


def status(governor: Governor) -> BudgetStatus:
    (only,) = governor.ledger.status()
    return only


def denials(governor: Governor) -> int:
    return len(governor.audit.query(action="budget.deny", limit=None))


def test_sequential_requests_never_overspend_and_the_last_denial_is_audited_once(governor_for):
    limit = 1_000
    governor = governor_for(policy(f"max_tokens: {limit}"))
    budget = gate(governor, block_size=4)
    usage = random.Random(3)
    spent = 0

    async def run() -> int:
        nonlocal spent
        ran = 0
        while True:
            try:
                ticket = await take(budget)
            except BudgetExhausted:
                return ran
            now = status(governor)
            assert now.spent_tokens + now.reserved_tokens <= limit  # holds included: never over the limit
            used = usage.randint(20, REQUEST_TOKENS)  # real usage never exceeds the worst case
            spent += used
            await budget.finish(ticket, used, 0.0)
            ran += 1

    ran = asyncio.run(run())
    asyncio.run(budget.close())
    final = status(governor)
    assert final.spent_tokens == spent <= limit
    assert final.reserved_tokens == 0
    assert limit - final.spent_tokens < REQUEST_TOKENS  # it stopped because not even one more fitted
    assert ran >= 10
    assert denials(governor) == 1  # the one real denial, not one per block size tried


def test_concurrent_requests_never_overspend_and_the_ledger_ends_at_their_total(governor_for):
    limit = 5_000
    governor = governor_for(policy(f"max_tokens: {limit}"))
    budget = gate(governor, block_size=8)
    rng = random.Random(11)
    used_by_request: list[int] = []
    peaks: list[int] = []

    async def one() -> None:
        try:
            ticket = await take(budget)
        except BudgetExhausted:
            return
        await asyncio.sleep(rng.random() / 1000)  # requests finish out of order, across blocks
        now = await asyncio.to_thread(status, governor)
        peaks.append(now.spent_tokens + now.reserved_tokens)
        used = rng.randint(1, REQUEST_TOKENS)
        used_by_request.append(used)
        await budget.finish(ticket, used, 0.0)

    async def run() -> None:
        sem = asyncio.Semaphore(12)

        async def bounded() -> None:
            async with sem:
                await one()

        await asyncio.gather(*(bounded() for _ in range(200)))
        await budget.close()

    asyncio.run(run())
    final = status(governor)
    assert max(peaks) <= limit
    assert final.spent_tokens == sum(used_by_request)
    assert final.reserved_tokens == 0
    assert len(used_by_request) < 200  # 200 x 100 worst case cannot fit in 5,000
    assert budget.reservations < len(used_by_request) / 2  # blocks, not one transaction per request


def test_a_budget_too_small_for_one_request_is_denied_before_anything_is_held(governor_for):
    governor = governor_for(policy(f"max_tokens: {REQUEST_TOKENS - 1}"))
    budget = gate(governor, block_size=16)
    with pytest.raises(BudgetExhausted, match="Budget exhausted.*batch-run") as denied:
        asyncio.run(take(budget))
    assert denied.value.permanent and denied.value.rule == "batch-run"
    assert denials(governor) == 1
    assert budget.reservations == 0
    assert status(governor).reserved_tokens == 0


def test_a_block_is_held_until_its_last_request_finishes_then_settled_with_real_usage(governor_for):
    governor = governor_for(policy("max_tokens: 100000"))
    budget = gate(governor, block_size=4)

    async def run() -> None:
        tickets = [await take(budget) for _ in range(4)]
        assert len({id(t.block) for t in tickets}) == 1
        fifth = await take(budget)  # the block is full: a new one, and the first one is closed
        for ticket in tickets[:3]:
            await budget.finish(ticket, 10, 0.0)
        held = status(governor)
        assert (held.reserved_tokens, held.spent_tokens) == (8 * REQUEST_TOKENS, 0)
        await budget.finish(tickets[3], 15, 0.0)
        settled = status(governor)
        assert (settled.reserved_tokens, settled.spent_tokens) == (4 * REQUEST_TOKENS, 45)
        await budget.finish(fifth, 1, 0.0)
        await budget.close()

    asyncio.run(run())
    final = status(governor)
    assert (final.reserved_tokens, final.spent_tokens) == (0, 46)
    assert budget.reservations == 2


def test_requests_of_different_sizes_share_a_block_while_they_fit(governor_for):
    governor = governor_for(policy("max_tokens: 100000"))
    budget = gate(governor, block_size=4)  # a block of 4 x 100 = 400

    async def run() -> list[int]:
        tickets = [await take(budget, tokens) for tokens in (100, 50, 200, 60)]
        for ticket in tickets:
            await budget.finish(ticket, 10, 0.0)
        await budget.close()
        return [id(t.block) for t in tickets]

    blocks = asyncio.run(run())
    assert blocks[0] == blocks[1] == blocks[2] and blocks[3] != blocks[0]  # 60 no longer fits in 50
    assert status(governor).spent_tokens == 40


def test_cost_limits_are_enforced_too(governor_for):
    governor = governor_for(policy("max_cost_usd: 0.001"))
    budget = gate(governor, block_size=16)  # ten requests' worst case fits

    async def run() -> int:
        ran = 0
        while True:
            try:
                ticket = await take(budget, cost=0.0001)
            except BudgetExhausted:
                return ran
            await budget.finish(ticket, 50, 0.0001)  # every request really costs its worst case
            ran += 1

    ran = asyncio.run(run())
    asyncio.run(budget.close())
    final = status(governor)
    assert ran == 10
    assert final.spent_cost_usd == pytest.approx(0.001)
    assert final.reserved_cost_usd == 0


def test_without_a_budget_nothing_is_reserved(governor_for):
    governor = governor_for(policy("max_tokens: 1000", dag="other"))
    budget = gate(governor, block_size=4)

    async def run() -> None:
        for _ in range(10):
            await budget.finish(await take(budget), 5, 0.0)
        await budget.close()

    asyncio.run(run())
    assert budget.reservations == 0
    assert governor.ledger.status() == []


def test_a_policy_change_of_the_budgets_closes_the_block_and_reserves_on_the_new_ones(governor_for):
    governor = governor_for(policy("max_tokens: 100000"))
    budget = gate(governor, block_size=8)

    async def run() -> None:
        first = await take(budget)
        await budget.finish(first, 10, 0.0)
        governor.policy = FixedPolicy(
            engine_from_text(policy("max_tokens: 100000").replace("batch-run", "batch-run-v2"))
        )
        second = await take(budget)
        assert second.block is not first.block
        await budget.finish(second, 20, 0.0)
        await budget.close()

    asyncio.run(run())
    spent = {s.budget: (s.spent_tokens, s.reserved_tokens) for s in governor.ledger.status()}
    assert spent == {"batch-run": (10, 0), "batch-run-v2": (20, 0)}
