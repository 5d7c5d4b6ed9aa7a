"""Read-only summaries of the audit trail and the budget ledger, for dashboards and reports.

Per DAG run: calls, denials (and the rules that denied), tokens, cost, latency; spend per time bucket and
DAG; budget usage against its limits, period by period; the chain verification status. All aggregation
runs in the database (SQLAlchemy Core over the tables :class:`~governed_ai.core.audit.AuditStore` and
:class:`~governed_ai.core.ledger.BudgetLedger` own), in SQL that SQLite and PostgreSQL both run, so a
summary costs one grouped query however long the history is. Nothing here writes a row.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import (
    ColumnElement,
    Engine,
    RowMapping,
    String,
    and_,
    case,
    func,
    or_,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from governed_ai.core.audit import GENESIS_HASH, AuditStore, ChainVerification, Decision, audit_table
from governed_ai.core.audit_anchors import AnchorLog
from governed_ai.core.keys import DeploymentKey
from governed_ai.core.ledger import BudgetLedger, budget_totals_table, micros_to_usd
from governed_ai.core.sqlstore import as_utc, read_transaction, utc_now

#: Action of a model call that reached the model (authorizations and denials are separate records).
MODEL_CALL = "model.call"
TOOL_CALL = "tool.call"
RETRIEVAL = "collection.query"

#: Stored content is shown up to this many characters in record listings (it can be 20,000).
CONTENT_PREVIEW_CHARS = 1_000
MAX_RUNS_PAGE = 200
MAX_RECORDS_PAGE = 500
#: A spend series is cut to its newest points beyond this (a chart cannot show more anyway).
MAX_SPEND_POINTS = 10_000
MAX_OPTIONS = 500

Bucket = Literal["day", "hour"]


class AuditFilter(BaseModel):
    """Which audit records a summary covers; every field that is set must match.

    ``since`` is inclusive and ``until`` exclusive, as in :meth:`AuditStore.query`; naive datetimes are
    taken to be UTC.
    """

    model_config = ConfigDict(frozen=True)

    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    model: str | None = None
    decision: Decision | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @model_validator(mode="after")
    def _time_window(self) -> AuditFilter:
        if self.since is not None and self.until is not None and as_utc(self.since) >= as_utc(self.until):
            raise ValueError(
                f"'since' ({self.since.isoformat()}) must be before 'until' ({self.until.isoformat()})"
            )
        return self

    def conditions(self) -> list[ColumnElement[bool]]:
        """The WHERE conditions of this filter on the audit table."""
        table = audit_table
        conditions: list[ColumnElement[bool]] = []
        for column, value in (
            (table.c.dag_id, self.dag_id),
            (table.c.run_id, self.run_id),
            (table.c.task_id, self.task_id),
            (table.c.model, self.model),
            (table.c.decision, self.decision),
            (table.c.action, self.action),
        ):
            if value is not None:
                conditions.append(column == value)
        if self.since is not None:
            conditions.append(table.c.time >= as_utc(self.since))
        if self.until is not None:
            conditions.append(table.c.time < as_utc(self.until))
        return conditions


class ActivityCounts(BaseModel):
    """What a set of audit records adds up to."""

    records: int = Field(description="audit records of any kind")
    model_calls: int = Field(description="model calls that were made (action model.call)")
    tool_calls: int = Field(description="tool calls (action tool.call)")
    retrievals: int = Field(description="vector-store queries (action collection.query)")
    denials: int = Field(description="records with decision 'deny': policy and budget refusals")
    errors: int = Field(description="records with outcome 'error': calls that were made and failed")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float
    latency_ms_avg: float | None = Field(description="mean latency of the model calls")


class DenialCount(BaseModel):
    """How often one rule (or budget) denied one kind of action."""

    action: str
    rule: str | None = Field(description="policy rule or budget that denied; None if no rule granted it")
    count: int


class RunSummary(ActivityCounts):
    """The governed activity of one DAG run (records without a run are grouped under run_id None)."""

    dag_id: str | None
    run_id: str | None
    latency_ms_p50: float | None = Field(description="median latency of the model calls")
    first_time: datetime
    last_time: datetime
    models: list[str]
    denied_by: list[DenialCount]


class RunTotals(ActivityCounts):
    """Everything the filter matches, over all runs (not just one page of them)."""

    runs: int


class RunsPage(BaseModel):
    """One page of run summaries, newest activity first."""

    totals: RunTotals
    runs: list[RunSummary]


class AuditRecordView(BaseModel):
    """An audit record as listed: stored content is cut to a preview."""

    seq: int
    time: datetime
    dag_id: str | None
    run_id: str | None
    task_id: str | None
    try_number: int | None
    map_index: int | None
    action: str
    resource: str | None
    decision: str
    rule: str | None
    model: str | None
    prompt_version: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None
    latency_ms: float | None
    outcome: str
    error: str | None = Field(description="the error, or for a denial the reason it was denied")
    content: str | None
    content_truncated: bool
    extra: dict[str, Any]
    hash: str


class RecordsPage(BaseModel):
    """One page of audit records, newest first, and how many match in all."""

    total: int
    records: list[AuditRecordView]


class SpendPoint(BaseModel):
    """Spend of one DAG in one time bucket."""

    bucket: str = Field(description="UTC bucket start: '2026-11-25' (day) or '2026-11-25T14:00' (hour)")
    dag_id: str | None
    cost_usd: float
    total_tokens: int
    model_calls: int


class SpendSeries(BaseModel):
    """Spend over time per DAG, oldest bucket first."""

    bucket: Bucket
    points: list[SpendPoint]
    truncated: bool = Field(description="True when older points were left out (more than the cap)")


class BudgetUsage(BaseModel):
    """One budget in one period: what was spent and held against its limits."""

    budget: str
    period: str = Field(description="period key: '2026-11-25', '2026-11' or a run_id")
    period_kind: str | None
    max_tokens: int | None
    max_cost_usd: float | None
    spent_tokens: int
    spent_cost_usd: float
    reserved_tokens: int
    reserved_cost_usd: float
    used_tokens_fraction: float | None = Field(description="(spent + reserved) / limit; None without limit")
    used_cost_fraction: float | None = Field(description="(spent + reserved) / limit; None without limit")
    resets_at: datetime | None
    updated_at: datetime | None


class ChainStatus(ChainVerification):
    """:class:`ChainVerification` plus when it was computed (results are reused for a short while)."""

    checked_at: datetime


class FilterOptions(BaseModel):
    """Values that occur in the audit trail, for filter pickers (each list capped)."""

    dag_ids: list[str]
    task_ids: list[str]
    models: list[str]
    actions: list[str]


class _UtcDay(FunctionElement[str]):
    """Start of the UTC day a timestamp falls in, as ISO text ('2026-11-25')."""

    type = String()
    inherit_cache = True
    name = "utc_day"


class _UtcHour(FunctionElement[str]):
    """Start of the UTC hour a timestamp falls in, as ISO text ('2026-11-25T14:00')."""

    type = String()
    inherit_cache = True
    name = "utc_hour"


@compiles(_UtcDay, "sqlite")
@compiles(_UtcHour, "sqlite")
def _utc_bucket_sqlite(element: _UtcDay | _UtcHour, compiler: SQLCompiler, **kw: Any) -> str:
    # UtcDateTime stores naive UTC text 'YYYY-MM-DD HH:MM:SS.ffffff' on SQLite.
    column = compiler.process(element.clauses, **kw)
    if isinstance(element, _UtcDay):
        return f"substr({column}, 1, 10)"
    return f"(substr({column}, 1, 10) || 'T' || substr({column}, 12, 2) || ':00')"


@compiles(_UtcDay, "postgresql")
@compiles(_UtcHour, "postgresql")
def _utc_bucket_postgresql(element: _UtcDay | _UtcHour, compiler: SQLCompiler, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    pattern = "YYYY-MM-DD" if isinstance(element, _UtcDay) else 'YYYY-MM-DD"T"HH24:00'
    return f"to_char({column} AT TIME ZONE 'UTC', '{pattern}')"


def _counts_columns() -> list[Any]:
    """Aggregate columns shared by run summaries and totals (labels match :class:`ActivityCounts`)."""
    t = audit_table
    is_model_call = t.c.action == MODEL_CALL
    return [
        func.count().label("records"),
        func.count(case((is_model_call, 1))).label("model_calls"),
        func.count(case((t.c.action == TOOL_CALL, 1))).label("tool_calls"),
        func.count(case((t.c.action == RETRIEVAL, 1))).label("retrievals"),
        func.count(case((t.c.decision == "deny", 1))).label("denials"),
        func.count(case((t.c.outcome == "error", 1))).label("errors"),
        func.coalesce(func.sum(t.c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(t.c.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(t.c.cost_usd), 0.0).label("cost_usd"),
        func.avg(case((is_model_call, t.c.latency_ms))).label("latency_ms_avg"),
    ]


def _counts(row: RowMapping) -> dict[str, Any]:
    # PostgreSQL returns SUM(bigint) and AVG as Decimal; SQLite as int/float. Normalise both.
    prompt, completion = int(row["prompt_tokens"]), int(row["completion_tokens"])
    average = row["latency_ms_avg"]
    return {
        "records": int(row["records"]),
        "model_calls": int(row["model_calls"]),
        "tool_calls": int(row["tool_calls"]),
        "retrievals": int(row["retrievals"]),
        "denials": int(row["denials"]),
        "errors": int(row["errors"]),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_usd": round(float(row["cost_usd"]), 9),
        "latency_ms_avg": None if average is None else round(float(average), 3),
    }


_RunKey = tuple[str | None, str | None]


def _same_run(dag_id: str | None, run_id: str | None) -> ColumnElement[bool]:
    # "= NULL" never matches; records without a DAG or run are grouped under NULL and found with IS NULL.
    t = audit_table
    return and_(
        t.c.dag_id.is_(None) if dag_id is None else t.c.dag_id == dag_id,
        t.c.run_id.is_(None) if run_id is None else t.c.run_id == run_id,
    )


class AuditViews:
    """Summaries of one governance store (the database the audit trail and budget ledger live in).

    ``verify_max_age_seconds``: :meth:`chain_status` walks and hashes the whole chain, so its result is
    reused for this long (0 recomputes every time; ``refresh=True`` forces it). ``key`` and ``anchors`` are
    what the chain is checked with; without them the status can never be ``ok``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        key: DeploymentKey | None = None,
        anchors: AnchorLog | None = None,
        verify_max_age_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if verify_max_age_seconds < 0:
            raise ValueError("verify_max_age_seconds must not be negative")
        self._engine = engine
        # Constructing the store and the ledger creates their tables when missing, so an empty store reads
        # as "no activity" rather than failing.
        self.audit = AuditStore(engine, key=key, anchors=anchors)
        BudgetLedger(engine)
        self._verify_max_age = verify_max_age_seconds
        self._clock = clock
        self._verify_lock = threading.Lock()
        self._verified: tuple[float, ChainStatus] | None = None

    # -- runs ------------------------------------------------------------------------------------------

    def runs(self, audit_filter: AuditFilter | None = None, *, limit: int = 50, offset: int = 0) -> RunsPage:
        """Per (DAG, run) summaries of the matching records, the run with the newest record first."""
        _check_page(limit, offset, MAX_RUNS_PAGE)
        conditions = (audit_filter or AuditFilter()).conditions()
        t = audit_table
        group = (t.c.dag_id, t.c.run_id)
        last_time = func.max(t.c.time)
        page_query = (
            select(
                *group,
                *_counts_columns(),
                func.min(t.c.time).label("first_time"),
                last_time.label("last_time"),
            )
            .where(*conditions)
            .group_by(*group)
            .order_by(last_time.desc(), t.c.dag_id, t.c.run_id)
            .limit(limit)
            .offset(offset)
        )
        totals_query = select(*_counts_columns()).where(*conditions)
        run_count_query = select(func.count()).select_from(
            select(*group).where(*conditions).group_by(*group).subquery()
        )
        with read_transaction(self._engine) as connection:
            page = connection.execute(page_query).mappings().all()
            totals_row = connection.execute(totals_query).mappings().one()
            run_count = int(connection.execute(run_count_query).scalar_one())
            keys: list[_RunKey] = [(row["dag_id"], row["run_id"]) for row in page]
            medians, models, denials = self._run_details(connection, conditions, keys)
        totals = RunTotals(runs=run_count, **_counts(totals_row))
        runs = [
            RunSummary(
                dag_id=row["dag_id"],
                run_id=row["run_id"],
                first_time=row["first_time"],
                last_time=row["last_time"],
                latency_ms_p50=medians.get((row["dag_id"], row["run_id"])),
                models=models.get((row["dag_id"], row["run_id"]), []),
                denied_by=denials.get((row["dag_id"], row["run_id"]), []),
                **_counts(row),
            )
            for row in page
        ]
        return RunsPage(totals=totals, runs=runs)

    @staticmethod
    def _run_details(
        connection: Connection, conditions: Sequence[ColumnElement[bool]], keys: Sequence[_RunKey]
    ) -> tuple[dict[_RunKey, float], dict[_RunKey, list[str]], dict[_RunKey, list[DenialCount]]]:
        """Median latency, models used and denials by rule, for the runs of one page only."""
        if not keys:
            return {}, {}, {}
        t = audit_table
        on_page = or_(*(_same_run(dag_id, run_id) for dag_id, run_id in keys))
        group = (t.c.dag_id, t.c.run_id)

        # Median with window functions (SQLite has no percentile aggregate): rank each run's latencies and
        # average the middle one (odd count) or two (even count).
        ranked = (
            select(
                *group,
                t.c.latency_ms,
                func.row_number().over(partition_by=group, order_by=t.c.latency_ms).label("position"),
                func.count().over(partition_by=group).label("n"),
            )
            .where(*conditions, on_page, t.c.action == MODEL_CALL, t.c.latency_ms.is_not(None))
            .subquery()
        )
        middle = or_(ranked.c.position == (ranked.c.n + 1) // 2, ranked.c.position == (ranked.c.n + 2) // 2)
        median_rows = connection.execute(
            select(ranked.c.dag_id, ranked.c.run_id, func.avg(ranked.c.latency_ms).label("p50"))
            .where(middle)
            .group_by(ranked.c.dag_id, ranked.c.run_id)
        ).mappings()
        medians = {(r["dag_id"], r["run_id"]): round(float(r["p50"]), 3) for r in median_rows}

        models: dict[_RunKey, list[str]] = {}
        model_rows = connection.execute(
            select(*group, t.c.model)
            .where(*conditions, on_page, t.c.model.is_not(None))
            .group_by(*group, t.c.model)
            .order_by(t.c.model)
        ).mappings()
        for r in model_rows:
            models.setdefault((r["dag_id"], r["run_id"]), []).append(r["model"])

        denials: dict[_RunKey, list[DenialCount]] = {}
        denial_rows = connection.execute(
            select(*group, t.c.action, t.c.rule, func.count().label("n"))
            .where(*conditions, on_page, t.c.decision == "deny")
            .group_by(*group, t.c.action, t.c.rule)
            .order_by(func.count().desc(), t.c.action)
        ).mappings()
        for r in denial_rows:
            denials.setdefault((r["dag_id"], r["run_id"]), []).append(
                DenialCount(action=r["action"], rule=r["rule"], count=int(r["n"]))
            )
        return medians, models, denials

    # -- records ---------------------------------------------------------------------------------------

    def records(
        self, audit_filter: AuditFilter | None = None, *, limit: int = 100, offset: int = 0
    ) -> RecordsPage:
        """Matching audit records, newest first."""
        _check_page(limit, offset, MAX_RECORDS_PAGE)
        conditions = (audit_filter or AuditFilter()).conditions()
        t = audit_table
        with read_transaction(self._engine) as connection:
            total = int(
                connection.execute(select(func.count()).select_from(t).where(*conditions)).scalar_one()
            )
            rows = (
                connection.execute(
                    select(t).where(*conditions).order_by(t.c.seq.desc()).limit(limit).offset(offset)
                )
                .mappings()
                .all()
            )
        return RecordsPage(total=total, records=[_record_view(row) for row in rows])

    # -- spend -----------------------------------------------------------------------------------------

    def spend(
        self,
        audit_filter: AuditFilter | None = None,
        *,
        bucket: Bucket = "day",
        max_points: int = MAX_SPEND_POINTS,
    ) -> SpendSeries:
        """Cost, tokens and model calls per time bucket (UTC) and DAG, oldest first.

        Only records that carry usage count (model calls, including failed ones that were charged).
        """
        if bucket not in ("day", "hour"):
            raise ValueError(f"bucket must be 'day' or 'hour', got {bucket!r}")
        if max_points < 1:
            raise ValueError("max_points must be at least 1")
        t = audit_table
        when = (_UtcDay(t.c.time) if bucket == "day" else _UtcHour(t.c.time)).label("bucket")
        has_usage = or_(
            t.c.cost_usd.is_not(None), t.c.prompt_tokens.is_not(None), t.c.completion_tokens.is_not(None)
        )
        statement = (
            select(
                when,
                t.c.dag_id,
                func.coalesce(func.sum(t.c.cost_usd), 0.0).label("cost_usd"),
                func.coalesce(
                    func.sum(func.coalesce(t.c.prompt_tokens, 0) + func.coalesce(t.c.completion_tokens, 0)), 0
                ).label("total_tokens"),
                func.count(case((t.c.action == MODEL_CALL, 1))).label("model_calls"),
            )
            .where(*(audit_filter or AuditFilter()).conditions(), has_usage)
            .group_by(when, t.c.dag_id)
            # Newest first so that the cap drops the oldest points; reversed below.
            .order_by(when.desc(), t.c.dag_id)
            .limit(max_points + 1)
        )
        with read_transaction(self._engine) as connection:
            rows = connection.execute(statement).mappings().all()
        truncated = len(rows) > max_points
        points = [
            SpendPoint(
                bucket=str(row["bucket"]),
                dag_id=row["dag_id"],
                cost_usd=round(float(row["cost_usd"]), 9),
                total_tokens=int(row["total_tokens"]),
                model_calls=int(row["model_calls"]),
            )
            for row in rows[:max_points]
        ]
        points.reverse()
        return SpendSeries(bucket=bucket, points=points, truncated=truncated)

    # -- budgets ---------------------------------------------------------------------------------------

    def budgets(
        self, *, budget: str | None = None, period: str | None = None, history: int = 1
    ) -> list[BudgetUsage]:
        """Usage of each budget in its ``history`` most recently charged periods (1 = the current one),
        oldest first within a budget; ``period`` picks one period key (e.g. a run_id) instead."""
        if not 1 <= history <= 366:
            raise ValueError(f"history must be between 1 and 366 periods, got {history}")
        b = budget_totals_table
        conditions: list[ColumnElement[bool]] = []
        if budget is not None:
            conditions.append(b.c.budget == budget)
        if period is not None:
            conditions.append(b.c.period == period)
        recency = func.row_number().over(
            partition_by=b.c.budget, order_by=(b.c.updated_at.desc(), b.c.period.desc())
        )
        ranked = select(b, recency.label("recency")).where(*conditions).subquery()
        statement = (
            select(ranked)
            .where(ranked.c.recency <= history)
            .order_by(ranked.c.budget, ranked.c.recency.desc())
        )
        with read_transaction(self._engine) as connection:
            rows = connection.execute(statement).mappings().all()
        return [_budget_usage(row) for row in rows]

    # -- chain -----------------------------------------------------------------------------------------

    def chain_status(self, *, refresh: bool = False) -> ChainStatus:
        """:meth:`AuditStore.verify`, reused for ``verify_max_age_seconds`` unless ``refresh``."""
        with self._verify_lock:
            # One verification at a time: concurrent page loads wait for it instead of each hashing the chain.
            now = self._clock()
            if not refresh and self._verified is not None and now - self._verified[0] < self._verify_max_age:
                return self._verified[1]
            try:
                result = self.audit.verify()
            except Exception as error:
                # A page must never show "verified" because the check itself could not run.
                result = ChainVerification(
                    ok=False,
                    status="error",
                    records_checked=0,
                    problem=f"verification failed: {type(error).__name__}: {error}",
                    head_seq=0,
                    head_hash=GENESIS_HASH,
                )
            status = ChainStatus(**result.model_dump(), checked_at=utc_now())
            self._verified = (self._clock(), status)
            return status

    # -- filter options --------------------------------------------------------------------------------

    def options(self, *, dag_id: str | None = None) -> FilterOptions:
        """Distinct DAGs, tasks, models and actions in the trail; with ``dag_id``, only those of that DAG
        (a user allowed to read one DAG's audit log learns nothing about the others)."""
        t = audit_table
        scope = [] if dag_id is None else [t.c.dag_id == dag_id]

        def distinct(connection: Connection, column: Any) -> list[str]:
            statement = (
                select(column)
                .where(column.is_not(None), *scope)
                .group_by(column)
                .order_by(column)
                .limit(MAX_OPTIONS)
            )
            return [str(value) for value in connection.execute(statement).scalars()]

        with read_transaction(self._engine) as connection:
            return FilterOptions(
                dag_ids=distinct(connection, t.c.dag_id),
                task_ids=distinct(connection, t.c.task_id),
                models=distinct(connection, t.c.model),
                actions=distinct(connection, t.c.action),
            )


def _check_page(limit: int, offset: int, maximum: int) -> None:
    if not 1 <= limit <= maximum:
        raise ValueError(f"limit must be between 1 and {maximum}, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")


def _record_view(row: RowMapping) -> AuditRecordView:
    content = row["content"]
    truncated = content is not None and len(content) > CONTENT_PREVIEW_CHARS
    fields = {name: row[name] for name in AuditRecordView.model_fields if name in row}
    fields.update(
        content=content[:CONTENT_PREVIEW_CHARS] if truncated else content,
        content_truncated=truncated,
        extra=json.loads(row["extra"]),
    )
    return AuditRecordView(**fields)


def _fraction(used: int, limit: int | None) -> float | None:
    if limit is None:
        return None
    if limit == 0:
        return 1.0  # nothing may be spent: the budget is used up by definition
    return used / limit


def _budget_usage(row: RowMapping) -> BudgetUsage:
    max_micros = row["max_cost_micros"]
    used_tokens = int(row["spent_tokens"]) + int(row["reserved_tokens"])
    used_micros = int(row["spent_cost_micros"]) + int(row["reserved_cost_micros"])
    return BudgetUsage(
        budget=row["budget"],
        period=row["period"],
        period_kind=row["period_kind"],
        max_tokens=row["max_tokens"],
        max_cost_usd=None if max_micros is None else micros_to_usd(max_micros),
        spent_tokens=int(row["spent_tokens"]),
        spent_cost_usd=micros_to_usd(int(row["spent_cost_micros"])),
        reserved_tokens=int(row["reserved_tokens"]),
        reserved_cost_usd=micros_to_usd(int(row["reserved_cost_micros"])),
        used_tokens_fraction=_fraction(used_tokens, row["max_tokens"]),
        used_cost_fraction=_fraction(used_micros, max_micros),
        resets_at=row["resets_at"],
        updated_at=row["updated_at"],
    )


__all__ = [
    "ActivityCounts",
    "AuditFilter",
    "AuditRecordView",
    "AuditViews",
    "BudgetUsage",
    "ChainStatus",
    "DenialCount",
    "FilterOptions",
    "RecordsPage",
    "RunSummary",
    "RunTotals",
    "RunsPage",
    "SpendPoint",
    "SpendSeries",
]
