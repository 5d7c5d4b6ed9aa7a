"""Budget ledger on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import multiprocessing
import pickle
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from governed_ai.core.ledger import (
    BudgetExceeded,
    BudgetKey,
    BudgetLedger,
    ReservationState,
    UnknownReservation,
)
from governed_ai.core.sqlstore import create_store_engine

START = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
NEXT_DAY = datetime(2026, 11, 26, tzinfo=UTC)


class MovableClock:
    """A clock the test moves by hand, so expiry is tested without sleeping or reading wall time."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def daily(budget: str = "support-daily", **limits: Any) -> BudgetKey:
    return BudgetKey(budget=budget, period="2026-11-25", period_kind="day", resets_at=NEXT_DAY, **limits)


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock(START)


@pytest.fixture
def ledger(store_engine: Engine, clock: MovableClock) -> BudgetLedger:
    return BudgetLedger(store_engine, clock=clock)


def test_settle_records_actual_usage_and_frees_the_rest_of_the_hold(ledger: BudgetLedger) -> None:
    key = daily(max_tokens=2_000, max_cost_usd=2.0)
    reservation = ledger.reserve([key], tokens=300, cost_usd=0.30, holder="dag/task/1", ttl_seconds=60)

    [held] = ledger.status([key])
    assert (held.reserved_tokens, held.reserved_cost_usd, held.spent_tokens) == (300, 0.30, 0)
    assert held.remaining_tokens == 1_700

    assert ledger.settle(reservation.id, tokens=120, cost_usd=0.12) is True

    [settled] = ledger.status([key])
    assert (settled.spent_tokens, settled.spent_cost_usd) == (120, 0.12)
    assert (settled.reserved_tokens, settled.reserved_cost_usd) == (0, 0.0)
    assert (settled.remaining_tokens, settled.remaining_cost_usd) == (1_880, 1.88)
    stored = ledger.get_reservation(reservation.id)
    assert stored.state is ReservationState.SETTLED
    assert (stored.settled_tokens, stored.settled_cost_usd) == (120, 0.12)


def test_settling_twice_does_not_count_twice(ledger: BudgetLedger) -> None:
    key = daily(max_tokens=1_000)
    reservation = ledger.reserve([key], tokens=100, cost_usd=0.0, holder="h", ttl_seconds=60)

    assert ledger.settle(reservation.id, tokens=80, cost_usd=0.01) is True
    assert ledger.settle(reservation.id, tokens=80, cost_usd=0.01) is False

    [status] = ledger.status([key])
    assert (status.spent_tokens, status.spent_cost_usd, status.reserved_tokens) == (80, 0.01, 0)


def test_release_frees_the_hold_and_spends_nothing(ledger: BudgetLedger) -> None:
    key = daily(max_tokens=1_000, max_cost_usd=1.0)
    reservation = ledger.reserve([key], tokens=400, cost_usd=0.4, holder="h", ttl_seconds=60)

    assert ledger.release(reservation.id) is True
    assert ledger.release(reservation.id) is False
    # The first terminal transition wins: a settle after a release is ignored.
    assert ledger.settle(reservation.id, tokens=400, cost_usd=0.4) is False

    [status] = ledger.status([key])
    assert (status.spent_tokens, status.reserved_tokens, status.remaining_tokens) == (0, 0, 1_000)
    assert ledger.get_reservation(reservation.id).state is ReservationState.RELEASED


def test_unknown_reservation_ids_are_rejected(ledger: BudgetLedger) -> None:
    with pytest.raises(UnknownReservation):
        ledger.settle("no-such-id", tokens=1, cost_usd=0.0)
    with pytest.raises(UnknownReservation):
        ledger.release("no-such-id")


def test_a_stale_hold_stops_blocking_once_its_ttl_has_passed(
    ledger: BudgetLedger, clock: MovableClock
) -> None:
    key = daily(max_tokens=1_000)
    crashed = ledger.reserve([key], tokens=1_000, cost_usd=0.0, holder="crashed-worker", ttl_seconds=30)
    with pytest.raises(BudgetExceeded):
        ledger.reserve([key], tokens=10, cost_usd=0.0, holder="next", ttl_seconds=30)

    clock.advance(31)
    # reserve() itself expires the stale hold; no separate sweep needed.
    fresh = ledger.reserve([key], tokens=10, cost_usd=0.0, holder="next", ttl_seconds=30)

    assert ledger.get_reservation(crashed.id).state is ReservationState.EXPIRED
    [status] = ledger.status([key])
    assert (status.reserved_tokens, status.spent_tokens) == (10, 0)
    assert ledger.get_reservation(fresh.id).state is ReservationState.HELD


def test_settling_an_expired_hold_still_records_the_spend(ledger: BudgetLedger, clock: MovableClock) -> None:
    key = daily(max_tokens=1_000)
    slow = ledger.reserve([key], tokens=200, cost_usd=0.0, holder="slow", ttl_seconds=5)
    clock.advance(6)
    assert ledger.expire_stale() == 1

    assert ledger.settle(slow.id, tokens=150, cost_usd=0.0) is True

    [status] = ledger.status([key])
    # The hold was already dropped by expiry, so only the spend is added (reserved is not taken twice).
    assert (status.spent_tokens, status.reserved_tokens) == (150, 0)


def test_expire_stale_drops_only_holds_past_their_ttl(ledger: BudgetLedger, clock: MovableClock) -> None:
    key = daily(max_tokens=10_000)
    short_a = ledger.reserve([key], tokens=100, cost_usd=0.0, holder="a", ttl_seconds=10)
    short_b = ledger.reserve([key], tokens=200, cost_usd=0.0, holder="b", ttl_seconds=10)
    long_c = ledger.reserve([key], tokens=400, cost_usd=0.0, holder="c", ttl_seconds=600)

    assert ledger.expire_stale(START + timedelta(seconds=5)) == 0
    assert ledger.expire_stale(START + timedelta(seconds=11)) == 2

    [status] = ledger.status([key])
    assert status.reserved_tokens == 400
    states = {r: ledger.get_reservation(r.id).state for r in (short_a, short_b, long_c)}
    assert states == {
        short_a: ReservationState.EXPIRED,
        short_b: ReservationState.EXPIRED,
        long_c: ReservationState.HELD,
    }


def test_a_call_is_reserved_on_all_keys_or_on_none(ledger: BudgetLedger) -> None:
    roomy = daily("org-daily", max_tokens=100_000)
    tight = BudgetKey(budget="run-cap", period="manual__2026-11-25", period_kind="run", max_tokens=500)
    ledger.reserve([tight], tokens=450, cost_usd=0.0, holder="first", ttl_seconds=60)

    with pytest.raises(BudgetExceeded) as denied:
        ledger.reserve([roomy, tight], tokens=100, cost_usd=0.0, holder="second", ttl_seconds=60)

    assert denied.value.budget == "run-cap"
    statuses = {s.budget: s for s in ledger.status([roomy, tight])}
    assert statuses["org-daily"].reserved_tokens == 0
    assert statuses["run-cap"].reserved_tokens == 450

    both = ledger.reserve([roomy, tight], tokens=50, cost_usd=0.0, holder="third", ttl_seconds=60)
    assert set(both.keys) == {roomy.ref, tight.ref}
    statuses = {s.budget: s for s in ledger.status([roomy, tight])}
    assert (statuses["org-daily"].reserved_tokens, statuses["run-cap"].reserved_tokens) == (50, 500)


def test_budget_exceeded_says_what_was_spent_held_and_asked(ledger: BudgetLedger) -> None:
    key = daily(max_tokens=2_000)
    spent = ledger.reserve([key], tokens=1_840, cost_usd=0.0, holder="a", ttl_seconds=60)
    ledger.settle(spent.id, tokens=1_840, cost_usd=0.0)
    ledger.reserve([key], tokens=120, cost_usd=0.0, holder="b", ttl_seconds=60)

    with pytest.raises(BudgetExceeded) as denied:
        ledger.reserve([key], tokens=300, cost_usd=0.0, holder="c", ttl_seconds=60)

    error = denied.value
    assert (error.budget, error.period, error.dimension) == ("support-daily", "2026-11-25", "tokens")
    assert (error.limit, error.spent, error.reserved, error.requested) == (2_000, 1_840, 120, 300)
    assert error.resets_at == NEXT_DAY
    assert str(error) == (
        "budget 'support-daily' (day 2026-11-25): 1,840/2,000 tokens spent, 120 reserved; "
        "this call needs up to 300; resets 2026-11-26T00:00Z"
    )
    # Crosses process boundaries intact (Airflow task runners, multiprocessing).
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_cost_limits_are_enforced_in_dollars(ledger: BudgetLedger) -> None:
    key = BudgetKey(budget="team-monthly", period="2026-11", period_kind="month", max_cost_usd=20.0)
    first = ledger.reserve([key], tokens=0, cost_usd=19.5, holder="a", ttl_seconds=60)
    ledger.settle(first.id, tokens=5_000, cost_usd=18.4)
    ledger.reserve([key], tokens=0, cost_usd=1.2, holder="b", ttl_seconds=60)

    with pytest.raises(BudgetExceeded) as denied:
        ledger.reserve([key], tokens=0, cost_usd=0.5, holder="c", ttl_seconds=60)

    error = denied.value
    assert error.dimension == "cost_usd"
    assert (error.limit, error.spent, error.reserved, error.requested) == (20.0, 18.4, 1.2, 0.5)
    assert str(error) == (
        "budget 'team-monthly' (month 2026-11): $18.40/$20.00 spent, $1.20 reserved; "
        "this call needs up to $0.50"
    )
    # What still fits is granted: 20.00 - 18.40 - 1.20 = 0.40 exactly (integer micro-dollars, no float drift).
    ledger.reserve([key], tokens=0, cost_usd=0.4, holder="d", ttl_seconds=60)


def test_status_lists_every_budget_and_reports_unseen_keys_as_untouched(ledger: BudgetLedger) -> None:
    day = daily(max_tokens=1_000)
    month = BudgetKey(budget="team-monthly", period="2026-11", max_cost_usd=50.0)
    ledger.reserve([day, month], tokens=250, cost_usd=1.25, holder="h", ttl_seconds=60)

    everything = ledger.status()
    assert [(s.budget, s.period) for s in everything] == [
        ("support-daily", "2026-11-25"),
        ("team-monthly", "2026-11"),
    ]
    assert everything[0].resets_at == NEXT_DAY
    assert (everything[1].max_cost_usd, everything[1].remaining_cost_usd, everything[1].remaining_tokens) == (
        50.0,
        48.75,
        None,
    )

    unseen = BudgetKey(budget="never-used", period="2026-11-25", max_tokens=70)
    [status] = ledger.status([unseen])
    assert (status.spent_tokens, status.reserved_tokens, status.remaining_tokens) == (0, 0, 70)


def test_a_changed_limit_applies_from_the_next_reservation(ledger: BudgetLedger) -> None:
    ledger.reserve([daily(max_tokens=1_000)], tokens=600, cost_usd=0.0, holder="a", ttl_seconds=60)

    with pytest.raises(BudgetExceeded):
        ledger.reserve([daily(max_tokens=800)], tokens=300, cost_usd=0.0, holder="b", ttl_seconds=60)
    ledger.reserve([daily(max_tokens=1_500)], tokens=300, cost_usd=0.0, holder="c", ttl_seconds=60)

    [status] = ledger.status()
    assert (status.max_tokens, status.reserved_tokens) == (1_500, 900)


def test_one_budget_listed_twice_is_charged_once_but_conflicting_limits_are_refused(
    ledger: BudgetLedger,
) -> None:
    key = daily(max_tokens=1_000)
    ledger.reserve([key, key], tokens=300, cost_usd=0.0, holder="h", ttl_seconds=60)
    [status] = ledger.status([key])
    assert status.reserved_tokens == 300

    with pytest.raises(ValueError, match="different limits"):
        ledger.reserve([key, daily(max_tokens=5)], tokens=1, cost_usd=0.0, holder="h", ttl_seconds=60)


def test_negative_amounts_and_ttls_are_refused(ledger: BudgetLedger) -> None:
    key = daily(max_tokens=1_000)
    with pytest.raises(ValueError):
        ledger.reserve([key], tokens=-1, cost_usd=0.0, holder="h", ttl_seconds=60)
    with pytest.raises(ValueError):
        ledger.reserve([key], tokens=1, cost_usd=0.0, holder="h", ttl_seconds=0)


# -- the race: many OS processes on one budget ---------------------------------------------------------

RACE_PROCESSES = 8
RACE_LIMIT_TOKENS = 12_000
RACE_CALL_TOKENS = 60
RACE_LIMIT_USD = 100.0
RACE_CALL_USD = 0.01


def _race_worker(url: str, worker: int, start: Any, results: Any) -> None:
    """Reserve then settle in a loop until the budget refuses; report how many calls got through."""
    engine = create_store_engine(url)
    try:
        ledger = BudgetLedger(engine)
        key = BudgetKey(
            budget="shared", period="2026-11-25", max_tokens=RACE_LIMIT_TOKENS, max_cost_usd=RACE_LIMIT_USD
        )
        granted = 0
        start.wait()
        while True:
            try:
                reservation = ledger.reserve(
                    [key],
                    tokens=RACE_CALL_TOKENS,
                    cost_usd=RACE_CALL_USD,
                    holder=f"w{worker}",
                    ttl_seconds=300,
                )
            except BudgetExceeded:
                # With actual == reserved, spent + held only grows: a refusal is final, never transient.
                break
            granted += 1
            # Alternate full and partial use; partial use frees room that later calls may take.
            used = RACE_CALL_TOKENS if granted % 2 else RACE_CALL_TOKENS // 2
            ledger.settle(reservation.id, tokens=used, cost_usd=RACE_CALL_USD)
        results.put((worker, granted, None))
    except BaseException as error:
        results.put((worker, -1, repr(error)))
    finally:
        engine.dispose()


@pytest.mark.timeout(120)
def test_concurrent_processes_never_overspend_a_budget(store_url: str) -> None:
    engine = create_store_engine(store_url)
    BudgetLedger(engine)  # create the tables once, before the processes race
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results = context.Queue()
    processes = [
        context.Process(target=_race_worker, args=(store_url, worker, start, results))
        for worker in range(RACE_PROCESSES)
    ]
    for process in processes:
        process.start()
    start.set()
    reports = [results.get(timeout=100) for _ in processes]
    for process in processes:
        process.join(timeout=30)

    errors = [report for report in reports if report[2] is not None]
    assert errors == []
    [status] = BudgetLedger(engine).status()
    engine.dispose()

    granted = sum(report[1] for report in reports)
    assert status.reserved_tokens == 0
    assert status.spent_tokens <= RACE_LIMIT_TOKENS
    assert status.spent_cost_usd == pytest.approx(granted * RACE_CALL_USD)
    # Odd-numbered calls of each worker use the full reservation, even-numbered ones half of it.
    full_calls = sum((report[1] + 1) // 2 for report in reports)
    half_calls = sum(report[1] // 2 for report in reports)
    assert status.spent_tokens == full_calls * RACE_CALL_TOKENS + half_calls * (RACE_CALL_TOKENS // 2)
    # Nothing that fitted was refused: once every worker stopped, not even one more call fits.
    assert RACE_LIMIT_TOKENS - status.spent_tokens < RACE_CALL_TOKENS
    # More calls got through than a limit/reservation count, because settled leftovers were reused.
    assert granted > RACE_LIMIT_TOKENS // RACE_CALL_TOKENS
