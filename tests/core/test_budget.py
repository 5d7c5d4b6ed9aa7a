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


# -- waiting for held budget, and stopping only when waiting cannot help -----------------------------------


def gate_for(
    governor: Governor, subject: Subject, *, wait_seconds: float = 5.0, lines: list[str] | None = None
):  # type: ignore[no-untyped-def]
    async def record(audit_record: AuditRecord) -> None:
        governor.record(audit_record)

    return BudgetGate(
        governor,
        subject,
        record=record,
        block_size=1,
        wait_seconds=wait_seconds,
        on_wait=lines.append if lines is not None else None,
        instance=governor.instance_digest(subject),
    )


GLOBAL_POLICY = """
version: 1
rules:
  - {name: all, match: {dag_id: "*"}, models: [{connection: llm, model: m}]}
budgets:
  - {name: shared, scope: global, period: day, max_tokens: LIMIT}
"""


def test_a_request_that_does_not_fit_waits_for_held_budget_to_clear_then_runs(governor_for):
    governor = governor_for(GLOBAL_POLICY.replace("LIMIT", "150"))
    other = gate_for(governor, SUBJECT.model_copy(update={"dag_id": "other_dag"}))
    waiting = gate_for(governor, SUBJECT)

    async def run() -> None:
        held = await take(other)  # 100 of 150 held by another task's request in flight
        started = asyncio.get_running_loop().time()
        pending = asyncio.create_task(take(waiting))
        await asyncio.sleep(0.3)
        assert not pending.done()  # waiting, not stopped: the room is only held
        await other.finish(held, 30, 0.0)  # the other request ends having used 30
        ticket = await pending
        assert asyncio.get_running_loop().time() - started >= 0.3
        await waiting.finish(ticket, 40, 0.0)
        await waiting.close()

    asyncio.run(run())
    final = status(governor)
    assert (final.spent_tokens, final.reserved_tokens) == (70, 0)
    assert denials(governor) == 0


def test_when_spend_alone_leaves_no_room_it_stops_at_once_saying_what_is_spent_and_held(governor_for):
    governor = governor_for(GLOBAL_POLICY.replace("LIMIT", "150"))
    first = gate_for(governor, SUBJECT)

    async def run() -> None:
        ticket = await take(first)
        await first.finish(ticket, 90, 0.0)  # 90 spent: 60 left, a request needs 100
        with pytest.raises(BudgetExhausted) as stopped:
            await take(first)
        message = str(stopped.value)
        assert "90 of 150 tokens spent" in message and "0 held" in message and "held by nobody" in message
        assert "needs up to 100 tokens" in message and "Raise the budget's limit" in message

    asyncio.run(run())
    assert denials(governor) == 1


def test_a_hold_that_never_clears_stops_the_wait_after_its_bound_naming_the_holder(governor_for):
    governor = governor_for(GLOBAL_POLICY.replace("LIMIT", "150"))
    stuck = gate_for(governor, SUBJECT.model_copy(update={"dag_id": "stuck_dag"}))
    lines: list[str] = []
    waiting = gate_for(governor, SUBJECT, wait_seconds=0.5, lines=lines)

    async def run() -> None:
        await take(stuck)  # never finished
        with pytest.raises(BudgetExhausted, match=r"waited .* held budget did not clear") as stopped:
            await take(waiting)
        assert "stuck_dag/run-1/classify" in str(stopped.value)

    asyncio.run(run())


def test_the_next_try_settles_a_killed_tries_holds_with_what_its_finished_requests_spent(governor_for):
    from governed_ai.core.journal import StepClaim, StepDone
    from governed_ai.core.store_writer import StoreWriter

    governor = governor_for(GLOBAL_POLICY.replace("LIMIT", "100000"))
    instance = governor.instance_digest(SUBJECT)
    dead = gate_for(governor, SUBJECT)  # try 1, killed with a block of 4 held
    dead._block_size = 4

    async def killed_try() -> str:
        tickets = [await take(dead) for _ in range(3)]
        return str(tickets[0].reservation_id)

    reservation = asyncio.run(killed_try())
    writer = StoreWriter(governor.audit)
    # Two of its requests completed (journaled with their usage); one was in flight at the kill.
    writer.write_sync(
        steps=[
            StepDone("chat", "k1", instance, "chat m", 1, reservation, {"r": 1}, 30, 5, 0.0),
            StepDone("chat", "k2", instance, "chat m", 1, reservation, {"r": 2}, 20, 5, 0.0),
            StepClaim("chat", "k3", instance, "chat m", 1, reservation),
        ]
    )
    writer.close()
    assert status(governor).reserved_tokens == 400

    retry = SUBJECT.model_copy(update={"try_number": 2})
    settled = governor.ledger.settle_dead_holds(instance, living_holder=governor.holder(retry))
    assert [r.id for r in settled] == [reservation]
    final = status(governor)
    assert (final.spent_tokens, final.reserved_tokens) == (60, 0)  # no hold outlives the retry


def test_an_expired_hold_is_settled_with_its_journaled_spend_not_released(governor_for, store_engine):
    from datetime import timedelta

    from governed_ai.core.journal import StepDone
    from governed_ai.core.ledger import BudgetLedger
    from governed_ai.core.sqlstore import utc_now
    from governed_ai.core.store_writer import StoreWriter

    governor = governor_for(GLOBAL_POLICY.replace("LIMIT", "100000"))
    keys = governor.budget_keys(SUBJECT)
    hold = governor.ledger.reserve(keys, tokens=500, cost_usd=0.0, holder="gone", ttl_seconds=1, instance="i")
    writer = StoreWriter(governor.audit)
    writer.write_sync(steps=[StepDone("chat", "k", "i", "chat m", 1, hold.id, {}, 40, 2, 0.0)])
    writer.close()
    later = BudgetLedger(store_engine, clock=lambda: utc_now() + timedelta(seconds=5))
    assert later.expire_stale() == 1
    final = later.status(keys)[0]
    assert (final.spent_tokens, final.reserved_tokens) == (42, 0)


def test_room_for_says_whether_a_budget_has_room_now(governor_for):
    from governed_ai.core.budget import room_for

    governor = governor_for(GLOBAL_POLICY.replace("LIMIT", "150"))
    assert room_for(governor, SUBJECT, tokens=100)[0]
    keys = governor.budget_keys(SUBJECT)
    governor.ledger.reserve(keys, tokens=120, cost_usd=0.0, holder="h", ttl_seconds=60)
    ready, why = room_for(governor, SUBJECT, tokens=100)
    assert not ready and "'shared'" in why and "30 tokens left" in why
    assert room_for(governor, SUBJECT, tokens=100, budgets=["nope"]) == (
        False,
        "budget(s) ['nope'] do not apply to this task under the current policy",
    )
