"""Token and cost budget ledger with reserve-then-settle accounting.

A governed call first *reserves* the most it can consume against every budget that applies to it (all or
nothing), then *settles* with what it actually used, which turns the hold into spend and frees the rest.
Because a hold counts against the limit from the moment it is granted, concurrent callers can never
jointly overshoot a budget: spend stays within the limit as long as actual usage does not exceed the
reservation. Holds that are never settled (a crashed worker) expire after their TTL.

Running totals are kept in one row per (budget, period), so a check is O(1) whatever the history. The
rows are locked in a fixed order (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite)
so reservers in different processes serialise without deadlocking.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    RowMapping,
    String,
    Table,
    Text,
    select,
    update,
)
from sqlalchemy.engine import Connection

from governed_ai.core.journal import journal_table, journal_usage_by_reservation
from governed_ai.core.sqlstore import (
    UtcDateTime,
    as_utc,
    ensure_tables,
    governance_metadata,
    insert_if_missing,
    read_transaction,
    utc_now,
    write_transaction,
)

# Money is kept as integer micro-dollars: exact on every backend, no float drift in running totals.
_MICROS_PER_USD = 1_000_000
# How many stale holds one reserve() clears on its way; the rest go on the next call or expire_stale().
_STALE_BATCH_IN_RESERVE = 100
_STALE_BATCH = 500

budget_totals_table = Table(
    "governed_ai_budget_totals",
    governance_metadata,
    Column("budget", String(200), primary_key=True),
    Column("period", String(100), primary_key=True),
    Column("period_kind", String(40), nullable=True),
    Column("max_tokens", BigInteger, nullable=True),
    Column("max_cost_micros", BigInteger, nullable=True),
    Column("resets_at", UtcDateTime, nullable=True),
    Column("spent_tokens", BigInteger, nullable=False, default=0),
    Column("spent_cost_micros", BigInteger, nullable=False, default=0),
    Column("reserved_tokens", BigInteger, nullable=False, default=0),
    Column("reserved_cost_micros", BigInteger, nullable=False, default=0),
    Column("updated_at", UtcDateTime, nullable=True),
)

budget_reservations_table = Table(
    "governed_ai_budget_reservations",
    governance_metadata,
    Column("id", String(36), primary_key=True),
    Column("holder", String(500), nullable=False),
    # JSON list of [budget, period] pairs; the limits live on the totals rows.
    Column("budget_keys", Text, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("state", String(16), nullable=False),
    Column("settled_tokens", BigInteger, nullable=True),
    Column("settled_cost_micros", BigInteger, nullable=True),
    Column("closed_at", UtcDateTime, nullable=True),
    # Digest of the task instance (not the try) that holds it: its next try settles a dead try's holds.
    Column("instance_sha256", String(64), nullable=True),
    Index("ix_governed_ai_budget_reservations_state_expires", "state", "expires_at"),
    Index("ix_governed_ai_budget_reservations_instance", "instance_sha256", "state"),
)

_LEDGER_TABLES = (budget_totals_table, budget_reservations_table, journal_table)

# (budget, period): identifies one totals row.
_KeyRef = tuple[str, str]


class BudgetKey(BaseModel):
    """One concrete budget window a call is charged against, as resolved by the policy engine."""

    model_config = ConfigDict(frozen=True)

    budget: str = Field(min_length=1, max_length=200, description="budget name, e.g. 'support-daily'")
    period: str = Field(
        min_length=1, max_length=100, description="period key: '2026-11-25', '2026-11', a run_id, ..."
    )
    max_tokens: int | None = Field(default=None, ge=0)
    max_cost_usd: float | None = Field(default=None, ge=0)
    resets_at: datetime | None = None
    period_kind: str | None = Field(
        default=None, max_length=40, description="for messages only: 'day', 'month', 'run', ..."
    )

    @field_validator("resets_at")
    @classmethod
    def _resets_at_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else as_utc(value)

    @property
    def ref(self) -> _KeyRef:
        """The (budget, period) pair that identifies this key's running totals."""
        return (self.budget, self.period)


class ReservationState(StrEnum):
    """Life cycle of a reservation: held, then exactly one of settled / released / expired."""

    HELD = "held"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"


class Reservation(BaseModel):
    """A hold on budget granted by :meth:`BudgetLedger.reserve`."""

    model_config = ConfigDict(frozen=True)

    id: str
    holder: str
    keys: tuple[tuple[str, str], ...] = Field(description="(budget, period) pairs the hold is on")
    tokens: int
    cost_usd: float
    created_at: datetime
    expires_at: datetime
    state: ReservationState = ReservationState.HELD
    settled_tokens: int | None = None
    settled_cost_usd: float | None = None
    closed_at: datetime | None = None


class BudgetStatus(BaseModel):
    """Spend, holds and what is left of one (budget, period)."""

    model_config = ConfigDict(frozen=True)

    budget: str
    period: str
    period_kind: str | None
    max_tokens: int | None
    max_cost_usd: float | None
    spent_tokens: int
    spent_cost_usd: float
    reserved_tokens: int
    reserved_cost_usd: float
    remaining_tokens: int | None = Field(description="None when there is no token limit")
    remaining_cost_usd: float | None = Field(description="None when there is no cost limit")
    resets_at: datetime | None


class Hold(BaseModel):
    """A live reservation on a budget, as a stop message shows it."""

    model_config = ConfigDict(frozen=True)

    holder: str
    tokens: int
    cost_usd: float
    expires_at: datetime


class UnknownReservation(KeyError):
    """settle()/release() was given an id the ledger never issued."""


class BudgetExceeded(Exception):
    """A reservation would take a budget over its limit; nothing was reserved on any key.

    ``dimension`` is "tokens" or "cost_usd"; ``limit``, ``spent`` (settled), ``reserved`` (held by other
    calls) and ``requested`` are in that dimension's unit.
    """

    def __init__(
        self,
        *,
        budget: str,
        period: str,
        period_kind: str | None,
        dimension: str,
        limit: int | float,
        spent: int | float,
        reserved: int | float,
        requested: int | float,
        resets_at: datetime | None,
    ) -> None:
        self.budget = budget
        self.period = period
        self.period_kind = period_kind
        self.dimension = dimension
        self.limit = limit
        self.spent = spent
        self.reserved = reserved
        self.requested = requested
        self.resets_at = resets_at
        super().__init__(self._message())

    def _fields(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "period": self.period,
            "period_kind": self.period_kind,
            "dimension": self.dimension,
            "limit": self.limit,
            "spent": self.spent,
            "reserved": self.reserved,
            "requested": self.requested,
            "resets_at": self.resets_at,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only __init__ would break the default exception pickling (multiprocessing, Celery).
        return (_rebuild_budget_exceeded, (self._fields(),))

    def _message(self) -> str:
        window = f"{self.period_kind} {self.period}" if self.period_kind else f"period {self.period}"
        if self.dimension == "tokens":
            spent = f"{int(self.spent):,}/{int(self.limit):,} tokens spent"
            reserved = f"{int(self.reserved):,} reserved"
            requested = f"{int(self.requested):,}"
        else:
            spent = f"{_format_usd(self.spent)}/{_format_usd(self.limit)} spent"
            reserved = f"{_format_usd(self.reserved)} reserved"
            requested = _format_usd(self.requested)
        message = f"budget '{self.budget}' ({window}): {spent}, {reserved}; this call needs up to {requested}"
        if self.resets_at is not None:
            message += f"; resets {_format_reset(self.resets_at)}"
        return message


def _rebuild_budget_exceeded(fields: dict[str, Any]) -> BudgetExceeded:
    return BudgetExceeded(**fields)


def _format_usd(value: float) -> str:
    # Cents hide sub-cent calls (a small model call costs $0.0003); show them in full.
    if value != 0 and abs(value) < 0.01:
        return f"${value:.6f}".rstrip("0")
    return f"${value:,.2f}"


def _format_reset(moment: datetime) -> str:
    moment = as_utc(moment)
    if moment.second == 0 and moment.microsecond == 0:
        return moment.strftime("%Y-%m-%dT%H:%MZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def usd_to_micros(value: float | Decimal | int) -> int:
    """Dollars to integer micro-dollars, rounded half up (via the decimal string, not the binary float)."""
    micros = (Decimal(str(value)) * _MICROS_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return int(micros)


def micros_to_usd(micros: int) -> float:
    """Integer micro-dollars to dollars."""
    return micros / _MICROS_PER_USD


class BudgetLedger:
    """Reserve-then-settle accounting of token and cost budgets in a SQL database.

    Safe to use from many threads and processes at once against one database. ``clock`` returns the
    current aware UTC time; tests inject one to move time without sleeping.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._engine = engine
        self._clock = clock
        ensure_tables(engine, _LEDGER_TABLES)

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- public API -------------------------------------------------------------------------------

    def reserve(
        self,
        keys: Sequence[BudgetKey],
        *,
        tokens: int,
        cost_usd: float,
        holder: str,
        ttl_seconds: float,
        instance: str | None = None,
    ) -> Reservation:
        """Hold ``tokens`` and ``cost_usd`` on every key, or on none and raise :class:`BudgetExceeded`.

        Stale holds (past their TTL) are expired in the same transaction first, so a crashed worker's
        hold never blocks a budget for longer than its TTL.
        """
        if tokens < 0 or cost_usd < 0:
            raise ValueError("tokens and cost_usd must not be negative")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        if len(holder) > 500:
            raise ValueError("holder must be at most 500 characters")
        unique_keys = _unique_keys(keys)
        cost_micros = usd_to_micros(cost_usd)
        now = self._clock()
        reservation = Reservation(
            id=uuid.uuid4().hex,
            holder=holder,
            keys=tuple(key.ref for key in unique_keys),
            tokens=tokens,
            cost_usd=micros_to_usd(cost_micros),
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_seconds),
        )
        denial: BudgetExceeded | None = None
        with write_transaction(self._engine) as connection:
            stale = self._lock_stale_holds(connection, now, _STALE_BATCH_IN_RESERVE)
            refs = {key.ref for key in unique_keys} | {ref for hold in stale for ref in _hold_refs(hold)}
            totals = self._lock_totals(connection, refs, now)
            self._drop_holds(connection, stale, totals, ReservationState.EXPIRED, now)
            for key in unique_keys:
                row = totals[key.ref]
                _apply_key_definition(row, key)
                denial = denial or _check_key(key, row, tokens, cost_micros)
            if denial is None:
                for key in unique_keys:
                    row = totals[key.ref]
                    row["reserved_tokens"] += tokens
                    row["reserved_cost_micros"] += cost_micros
                connection.execute(
                    budget_reservations_table.insert().values(
                        id=reservation.id,
                        holder=holder,
                        budget_keys=json.dumps([list(ref) for ref in reservation.keys]),
                        tokens=tokens,
                        cost_micros=cost_micros,
                        created_at=reservation.created_at,
                        expires_at=reservation.expires_at,
                        state=ReservationState.HELD.value,
                        instance_sha256=instance,
                    )
                )
            self._write_totals(connection, totals, now)
        # Raised after commit: the expiry work above is kept even when this call is denied.
        if denial is not None:
            raise denial
        return reservation

    def settle(self, reservation_id: str, *, tokens: int, cost_usd: float) -> bool:
        """Record what the call actually used and free the rest of its hold.

        Returns False (and changes nothing) if the reservation was already settled or released, so a
        retried settle never counts twice. Settling a hold that already expired still records the spend:
        the call did consume it.
        """
        if tokens < 0 or cost_usd < 0:
            raise ValueError("tokens and cost_usd must not be negative")
        cost_micros = usd_to_micros(cost_usd)
        now = self._clock()
        with write_transaction(self._engine) as connection:
            hold = self._lock_reservation(connection, reservation_id)
            state = ReservationState(hold["state"])
            if state in (ReservationState.SETTLED, ReservationState.RELEASED):
                return False
            totals = self._lock_totals(connection, _hold_refs(hold), now)
            for row in totals.values():
                if state is ReservationState.HELD:
                    _unhold(row, hold)
                row["spent_tokens"] += tokens
                row["spent_cost_micros"] += cost_micros
            self._write_totals(connection, totals, now)
            connection.execute(
                update(budget_reservations_table)
                .where(budget_reservations_table.c.id == reservation_id)
                .values(
                    state=ReservationState.SETTLED.value,
                    settled_tokens=tokens,
                    settled_cost_micros=cost_micros,
                    closed_at=now,
                )
            )
        return True

    def release(self, reservation_id: str) -> bool:
        """Drop a hold without spending anything (the call failed before using the model).

        Returns False if the reservation was no longer held (settled, released or expired).
        """
        now = self._clock()
        with write_transaction(self._engine) as connection:
            hold = self._lock_reservation(connection, reservation_id)
            if hold["state"] != ReservationState.HELD.value:
                return False
            totals = self._lock_totals(connection, _hold_refs(hold), now)
            self._drop_holds(connection, [hold], totals, ReservationState.RELEASED, now)
            self._write_totals(connection, totals, now)
        return True

    def expire_stale(self, now: datetime | None = None) -> int:
        """Drop every hold whose TTL ran out before ``now`` (default: the clock); returns how many."""
        moment = self._clock() if now is None else as_utc(now)
        expired = 0
        while True:
            with write_transaction(self._engine) as connection:
                stale = self._lock_stale_holds(connection, moment, _STALE_BATCH)
                if not stale:
                    return expired
                refs = {ref for hold in stale for ref in _hold_refs(hold)}
                totals = self._lock_totals(connection, refs, moment)
                self._drop_holds(connection, stale, totals, ReservationState.EXPIRED, moment)
                self._write_totals(connection, totals, moment)
            expired += len(stale)
            if len(stale) < _STALE_BATCH:
                return expired

    def charge(
        self, keys: Sequence[BudgetKey], *, tokens: int, cost_usd: float, holder: str, instance: str | None
    ) -> Reservation:
        """Record spend that was never reserved (a request a killed try sent and never saw the end of: the
        provider billed it). Counted even past the limit, because it was spent; kept as a settled
        reservation, so the ledger's history shows it."""
        if tokens < 0 or cost_usd < 0:
            raise ValueError("tokens and cost_usd must not be negative")
        unique_keys = _unique_keys(keys)
        cost_micros = usd_to_micros(cost_usd)
        now = self._clock()
        reservation = Reservation(
            id=uuid.uuid4().hex,
            holder=holder,
            keys=tuple(key.ref for key in unique_keys),
            tokens=0,
            cost_usd=0.0,
            created_at=now,
            expires_at=now,
            state=ReservationState.SETTLED,
            settled_tokens=tokens,
            settled_cost_usd=micros_to_usd(cost_micros),
            closed_at=now,
        )
        with write_transaction(self._engine) as connection:
            totals = self._lock_totals(connection, [key.ref for key in unique_keys], now)
            for key in unique_keys:
                row = totals[key.ref]
                _apply_key_definition(row, key)
                row["spent_tokens"] += tokens
                row["spent_cost_micros"] += cost_micros
            connection.execute(
                budget_reservations_table.insert().values(
                    id=reservation.id,
                    holder=holder,
                    budget_keys=json.dumps([list(ref) for ref in reservation.keys]),
                    tokens=0,
                    cost_micros=0,
                    created_at=now,
                    expires_at=now,
                    state=ReservationState.SETTLED.value,
                    settled_tokens=tokens,
                    settled_cost_micros=cost_micros,
                    closed_at=now,
                    instance_sha256=instance,
                )
            )
            self._write_totals(connection, totals, now)
        return reservation

    def settle_dead_holds(self, instance: str, *, living_holder: str) -> list[Reservation]:
        """Settle every hold of task instance ``instance`` that another try than ``living_holder`` left
        behind (a try that was killed), with what the journal says its completed requests really used, and
        release the rest at once instead of after the TTL. Returns the settled reservations."""
        table = budget_reservations_table
        now = self._clock()
        settled: list[Reservation] = []
        with write_transaction(self._engine) as connection:
            holds = [
                dict(row)
                for row in connection.execute(
                    select(table)
                    .where(
                        table.c.instance_sha256 == instance,
                        table.c.state == ReservationState.HELD.value,
                        table.c.holder != living_holder,
                    )
                    .with_for_update()
                ).mappings()
            ]
            if not holds:
                return []
            usage = journal_usage_by_reservation(connection, [hold["id"] for hold in holds])
            totals = self._lock_totals(connection, {ref for hold in holds for ref in _hold_refs(hold)}, now)
            for hold in holds:
                tokens, cost_micros = usage.get(hold["id"], (0, 0))
                self._close_hold(connection, hold, totals, ReservationState.SETTLED, now, tokens, cost_micros)
                settled.append(_reservation_from_row(hold))
            self._write_totals(connection, totals, now)
        return settled

    def holds(self, keys: Iterable[BudgetKey]) -> list[Hold]:
        """The live holds on these budgets, largest first: who holds how much, until when."""
        refs = {key.ref for key in keys}
        table = budget_reservations_table
        now = self._clock()
        with read_transaction(self._engine) as connection:
            rows = connection.execute(
                select(table).where(table.c.state == ReservationState.HELD.value, table.c.expires_at >= now)
            ).mappings()
            found = [
                Hold(
                    holder=row["holder"],
                    tokens=int(row["tokens"]),
                    cost_usd=micros_to_usd(int(row["cost_micros"])),
                    expires_at=row["expires_at"],
                )
                for row in rows
                if refs & set(_hold_refs(row))
            ]
        return sorted(found, key=lambda hold: (hold.tokens, hold.cost_usd), reverse=True)

    def status(self, keys: Iterable[BudgetKey] | None = None) -> list[BudgetStatus]:
        """Current totals of the given keys (limits as the keys define them now), or of every budget
        the ledger has seen, ordered by budget and period. Reads only; holds past their TTL still count
        until :meth:`expire_stale` or the next :meth:`reserve` drops them."""
        table = budget_totals_table
        with read_transaction(self._engine) as connection:
            if keys is None:
                rows = connection.execute(select(table).order_by(table.c.budget, table.c.period)).mappings()
                return [_status_from_row(dict(row)) for row in rows]
            statuses = []
            for key in _unique_keys(list(keys)):
                found = (
                    connection.execute(
                        select(table).where(table.c.budget == key.budget, table.c.period == key.period)
                    )
                    .mappings()
                    .first()
                )
                row = dict(found) if found is not None else _empty_totals(key)
                _apply_key_definition(row, key)
                statuses.append(_status_from_row(row))
            return statuses

    def get_reservation(self, reservation_id: str) -> Reservation:
        """The stored state of a reservation (for diagnostics and tests)."""
        with read_transaction(self._engine) as connection:
            row = (
                connection.execute(
                    select(budget_reservations_table).where(budget_reservations_table.c.id == reservation_id)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise UnknownReservation(reservation_id)
        return _reservation_from_row(row)

    # -- internals --------------------------------------------------------------------------------

    @staticmethod
    def _lock_stale_holds(connection: Connection, now: datetime, limit: int) -> list[dict[str, Any]]:
        table = budget_reservations_table
        # SKIP LOCKED: a hold being settled right now is that settle's business, not ours. Locking
        # reservation rows before totals rows, like settle() does, keeps the lock order deadlock-free.
        rows = connection.execute(
            select(table)
            .where(table.c.state == ReservationState.HELD.value, table.c.expires_at < now)
            .order_by(table.c.expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).mappings()
        return [dict(row) for row in rows]

    @staticmethod
    def _lock_reservation(connection: Connection, reservation_id: str) -> dict[str, Any]:
        table = budget_reservations_table
        row = (
            connection.execute(select(table).where(table.c.id == reservation_id).with_for_update())
            .mappings()
            .first()
        )
        if row is None:
            raise UnknownReservation(reservation_id)
        return dict(row)

    @staticmethod
    def _lock_totals(
        connection: Connection, refs: Iterable[_KeyRef], now: datetime
    ) -> dict[_KeyRef, dict[str, Any]]:
        """Lock (creating if needed) the totals row of every ref, always in sorted order."""
        table = budget_totals_table
        totals: dict[_KeyRef, dict[str, Any]] = {}
        for budget, period in sorted(set(refs)):
            query = select(table).where(table.c.budget == budget, table.c.period == period).with_for_update()
            row = connection.execute(query).mappings().first()
            if row is None:
                insert_if_missing(
                    connection,
                    table,
                    {
                        "budget": budget,
                        "period": period,
                        "spent_tokens": 0,
                        "spent_cost_micros": 0,
                        "reserved_tokens": 0,
                        "reserved_cost_micros": 0,
                        "updated_at": now,
                    },
                )
                row = connection.execute(query).mappings().one()
            totals[(budget, period)] = dict(row)
        return totals

    def _drop_holds(
        self,
        connection: Connection,
        holds: Sequence[dict[str, Any]],
        totals: dict[_KeyRef, dict[str, Any]],
        new_state: ReservationState,
        now: datetime,
    ) -> None:
        # An expired hold belonged to a try that died or hung: what its finished requests really spent is
        # in the journal, and is spent, not released.
        usage = (
            journal_usage_by_reservation(connection, [hold["id"] for hold in holds])
            if new_state is ReservationState.EXPIRED
            else {}
        )
        for hold in holds:
            tokens, cost_micros = usage.get(hold["id"], (0, 0))
            self._close_hold(connection, hold, totals, new_state, now, tokens, cost_micros)

    @staticmethod
    def _close_hold(
        connection: Connection,
        hold: dict[str, Any],
        totals: dict[_KeyRef, dict[str, Any]],
        new_state: ReservationState,
        now: datetime,
        tokens: int,
        cost_micros: int,
    ) -> None:
        for ref in _hold_refs(hold):
            row = totals[ref]
            _unhold(row, hold)
            row["spent_tokens"] += tokens
            row["spent_cost_micros"] += cost_micros
        table = budget_reservations_table
        values: dict[str, Any] = {"state": new_state.value, "closed_at": now}
        if tokens or cost_micros or new_state is ReservationState.SETTLED:
            values.update(settled_tokens=tokens, settled_cost_micros=cost_micros)
        connection.execute(update(table).where(table.c.id == hold["id"]).values(**values))

    @staticmethod
    def _write_totals(connection: Connection, totals: dict[_KeyRef, dict[str, Any]], now: datetime) -> None:
        table = budget_totals_table
        for (budget, period), row in totals.items():
            connection.execute(
                update(table)
                .where(table.c.budget == budget, table.c.period == period)
                .values(
                    period_kind=row["period_kind"],
                    max_tokens=row["max_tokens"],
                    max_cost_micros=row["max_cost_micros"],
                    resets_at=row["resets_at"],
                    spent_tokens=row["spent_tokens"],
                    spent_cost_micros=row["spent_cost_micros"],
                    reserved_tokens=row["reserved_tokens"],
                    reserved_cost_micros=row["reserved_cost_micros"],
                    updated_at=now,
                )
            )


def _unique_keys(keys: Sequence[BudgetKey]) -> list[BudgetKey]:
    """Keys in caller order with duplicates removed; one (budget, period) must not carry two limits."""
    seen: dict[_KeyRef, BudgetKey] = {}
    for key in keys:
        previous = seen.get(key.ref)
        if previous is None:
            seen[key.ref] = key
        elif previous != key:
            raise ValueError(f"budget {key.budget!r} period {key.period!r} given twice with different limits")
    return list(seen.values())


def _hold_refs(hold: RowMapping | dict[str, Any]) -> list[_KeyRef]:
    return [(str(budget), str(period)) for budget, period in json.loads(hold["budget_keys"])]


def _unhold(row: dict[str, Any], hold: dict[str, Any]) -> None:
    # Never below zero, even if totals were repaired by hand while holds were out.
    row["reserved_tokens"] = max(0, row["reserved_tokens"] - hold["tokens"])
    row["reserved_cost_micros"] = max(0, row["reserved_cost_micros"] - hold["cost_micros"])


def _apply_key_definition(row: dict[str, Any], key: BudgetKey) -> None:
    """The policy that resolved ``key`` is the source of truth for its limits; remember the latest."""
    row["period_kind"] = key.period_kind
    row["max_tokens"] = key.max_tokens
    row["max_cost_micros"] = None if key.max_cost_usd is None else usd_to_micros(key.max_cost_usd)
    row["resets_at"] = key.resets_at


def _check_key(key: BudgetKey, row: dict[str, Any], tokens: int, cost_micros: int) -> BudgetExceeded | None:
    common: dict[str, Any] = {
        "budget": key.budget,
        "period": key.period,
        "period_kind": key.period_kind,
        "resets_at": key.resets_at,
    }
    max_tokens = row["max_tokens"]
    if max_tokens is not None and row["spent_tokens"] + row["reserved_tokens"] + tokens > max_tokens:
        return BudgetExceeded(
            dimension="tokens",
            limit=max_tokens,
            spent=row["spent_tokens"],
            reserved=row["reserved_tokens"],
            requested=tokens,
            **common,
        )
    max_micros = row["max_cost_micros"]
    if (
        max_micros is not None
        and row["spent_cost_micros"] + row["reserved_cost_micros"] + cost_micros > max_micros
    ):
        return BudgetExceeded(
            dimension="cost_usd",
            limit=micros_to_usd(max_micros),
            spent=micros_to_usd(row["spent_cost_micros"]),
            reserved=micros_to_usd(row["reserved_cost_micros"]),
            requested=micros_to_usd(cost_micros),
            **common,
        )
    return None


def _empty_totals(key: BudgetKey) -> dict[str, Any]:
    return {
        "budget": key.budget,
        "period": key.period,
        "spent_tokens": 0,
        "spent_cost_micros": 0,
        "reserved_tokens": 0,
        "reserved_cost_micros": 0,
    }


def _status_from_row(row: dict[str, Any]) -> BudgetStatus:
    max_tokens = row["max_tokens"]
    max_micros = row["max_cost_micros"]
    used_tokens = row["spent_tokens"] + row["reserved_tokens"]
    used_micros = row["spent_cost_micros"] + row["reserved_cost_micros"]
    return BudgetStatus(
        budget=row["budget"],
        period=row["period"],
        period_kind=row["period_kind"],
        max_tokens=max_tokens,
        max_cost_usd=None if max_micros is None else micros_to_usd(max_micros),
        spent_tokens=row["spent_tokens"],
        spent_cost_usd=micros_to_usd(row["spent_cost_micros"]),
        reserved_tokens=row["reserved_tokens"],
        reserved_cost_usd=micros_to_usd(row["reserved_cost_micros"]),
        remaining_tokens=None if max_tokens is None else max(0, max_tokens - used_tokens),
        remaining_cost_usd=None if max_micros is None else micros_to_usd(max(0, max_micros - used_micros)),
        resets_at=row["resets_at"],
    )


def _reservation_from_row(row: RowMapping | dict[str, Any]) -> Reservation:
    settled_micros = row["settled_cost_micros"]
    return Reservation(
        id=row["id"],
        holder=row["holder"],
        keys=tuple(_hold_refs(row)),
        tokens=row["tokens"],
        cost_usd=micros_to_usd(row["cost_micros"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        state=ReservationState(row["state"]),
        settled_tokens=row["settled_tokens"],
        settled_cost_usd=None if settled_micros is None else micros_to_usd(settled_micros),
        closed_at=row["closed_at"],
    )
