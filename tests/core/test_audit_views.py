"""AuditViews: run summaries, record pages, spend series, budget usage and chain status, in SQL.

Every test runs on SQLite and on a real PostgreSQL server (the ``store_url`` fixture). The store is filled
through the real Governor (policy, ledger, audit) or the real AuditStore/BudgetLedger APIs; expected
values are recomputed in Python from the records the store returns, never typed in.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, update

from governed_ai.core.audit import AuditRecord, AuditStore, StoredAuditRecord, audit_table
from governed_ai.core.audit_anchors import AnchorLog
from governed_ai.core.audit_views import (
    CONTENT_PREVIEW_CHARS,
    AuditFilter,
    AuditViews,
    RunSummary,
)
from governed_ai.core.governor import Governor
from governed_ai.core.keys import DeploymentKey
from governed_ai.core.ledger import BudgetKey, BudgetLedger
from governed_ai.core.policy import PolicyProvider
from governed_ai.core.pricing import PriceTable
from governed_ai.core.subject import Subject
from tests.fakes.governed_calls import record_governed_call

PRICES = PriceTable.from_mapping({"*": {"input_per_1m_tokens": 3.0, "output_per_1m_tokens": 15.0}})
KEY = DeploymentKey.from_text("views-test-key-0123456789abcdef", source="test")

POLICY = """
version: 1
rules:
  - name: views-rule
    match: {dag_id: "views_*"}
    models:
      - {connection: llm, model: small}
      - {connection: llm, model: large}
budgets:
  - name: views-per-run
    scope: dag
    match: {dag_id: "views_*"}
    period: run
    max_tokens: 400
"""


@dataclass
class ScriptedModel:
    """A named fake of the model endpoint: the next scripted latency and a fixed usage per call."""

    latencies: list[float]
    prompt_tokens: int = 40
    completion_tokens: int = 9
    calls: int = 0


@pytest.fixture
def views(store_engine: Engine) -> Iterator[AuditViews]:
    yield AuditViews(store_engine, verify_max_age_seconds=0)


def governor_for(engine: Engine, audit: AuditStore | None = None) -> Governor:
    return Governor(
        policy=PolicyProvider(text=POLICY), ledger=BudgetLedger(engine), audit=audit or AuditStore(engine)
    )


def call(governor: Governor, subject: Subject, model: str, fake: ScriptedModel, max_tokens: int = 20) -> None:
    """One governed call's records; the scripted latency is used only when the model is really called."""
    outcome = record_governed_call(
        governor, subject, model, latency_ms=fake.latencies[0], prompt_tokens=fake.prompt_tokens,
        completion_tokens=fake.completion_tokens, max_tokens=max_tokens, prices=PRICES,
    )  # fmt: skip
    if outcome == "ok":
        fake.latencies.pop(0)


def fill_through_governor(engine: Engine, audit: AuditStore | None = None) -> None:
    """Two runs of one DAG and one of another: allowed calls, a denied model and a budget stop."""
    governor = governor_for(engine, audit)
    run_1 = Subject(dag_id="views_a", task_id="ask", run_id="run-1")
    fake = ScriptedModel(latencies=[30.0, 10.0, 20.0, 50.0, 5.0])
    for model in ("small", "small", "large"):
        call(governor, run_1, model, fake)
    call(governor, run_1.model_copy(update={"task_id": "sneaky"}), "gpt-4o", fake)  # no rule grants it
    call(governor, run_1.model_copy(update={"task_id": "greedy"}), "small", fake, max_tokens=390)  # budget
    call(governor, Subject(dag_id="views_a", task_id="ask", run_id="run-2"), "small", fake)
    call(governor, Subject(dag_id="views_b", task_id="ask", run_id="run-9"), "large", fake)
    # A record outside any run (e.g. written by a maintenance job) is grouped under (None, None).
    governor.record(AuditRecord(action="store.maintenance", outcome="ok"))


def all_records(engine: Engine) -> list[StoredAuditRecord]:
    return AuditStore(engine).query(limit=None, order="asc")


def matches(record: StoredAuditRecord, f: AuditFilter) -> bool:
    for name in ("dag_id", "run_id", "task_id", "model", "decision", "action"):
        wanted = getattr(f, name)
        if wanted is not None and getattr(record, name) != wanted:
            return False
    if f.since is not None and record.time < f.since:
        return False
    return f.until is None or record.time < f.until


def expected_counts(records: Iterable[StoredAuditRecord]) -> dict[str, Any]:
    rows = list(records)
    model_calls = [r for r in rows if r.action == "model.call"]
    prompt = sum(r.prompt_tokens or 0 for r in rows)
    completion = sum(r.completion_tokens or 0 for r in rows)
    latencies = [r.latency_ms for r in model_calls if r.latency_ms is not None]
    return {
        "records": len(rows),
        "model_calls": len(model_calls),
        "tool_calls": sum(r.action == "tool.call" for r in rows),
        "retrievals": sum(r.action == "collection.query" for r in rows),
        "denials": sum(r.decision == "deny" for r in rows),
        "errors": sum(r.outcome == "error" for r in rows),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_usd": pytest.approx(sum(r.cost_usd or 0.0 for r in rows)),
        "latency_ms_avg": pytest.approx(statistics.mean(latencies)) if latencies else None,
    }


def expected_run(records: list[StoredAuditRecord]) -> dict[str, Any]:
    latencies = [r.latency_ms for r in records if r.action == "model.call" and r.latency_ms is not None]
    denials = Counter((r.action, r.rule) for r in records if r.decision == "deny")
    return {
        **expected_counts(records),
        "latency_ms_p50": pytest.approx(statistics.median(latencies)) if latencies else None,
        "first_time": min(r.time for r in records),
        "last_time": max(r.time for r in records),
        "models": sorted({r.model for r in records if r.model is not None}),
        "denied_by": sorted((action, rule, n) for (action, rule), n in denials.items()),
    }


def actual_run(run: RunSummary) -> dict[str, Any]:
    data = run.model_dump(exclude={"dag_id", "run_id"})
    data["denied_by"] = sorted((d["action"], d["rule"], d["count"]) for d in data["denied_by"])
    return data


# -- runs --------------------------------------------------------------------------------------------------


def test_run_summaries_add_up_what_the_governor_recorded(store_engine, views):
    fill_through_governor(store_engine)
    records = all_records(store_engine)

    page = views.runs()

    by_run: dict[tuple[str | None, str | None], list[StoredAuditRecord]] = {}
    for record in records:
        by_run.setdefault((record.dag_id, record.run_id), []).append(record)
    assert {(r.dag_id, r.run_id) for r in page.runs} == set(by_run)
    for run in page.runs:
        assert actual_run(run) == expected_run(by_run[(run.dag_id, run.run_id)]), (run.dag_id, run.run_id)
    assert page.totals.model_dump() == {**expected_counts(records), "runs": len(by_run)}
    # The scenario really contains what the page is for: both kinds of denial, with their rules.
    run_1 = next(r for r in page.runs if r.run_id == "run-1")
    assert {(d.action, d.rule) for d in run_1.denied_by} == {
        ("model.authorize", None),
        ("budget.deny", "views-per-run"),
    }
    assert run_1.model_calls == 3 and run_1.latency_ms_p50 == pytest.approx(20.0)


def test_median_latency_of_an_even_number_of_calls_is_the_mean_of_the_middle_two(store_engine, views):
    governor = governor_for(store_engine)
    subject = Subject(dag_id="views_even", task_id="t", run_id="r")
    latencies = [7.0, 100.0, 1.0, 12.0]
    fake = ScriptedModel(latencies=list(latencies))
    for _ in latencies:
        call(governor, subject, "small", fake, max_tokens=5)

    (run,) = views.runs().runs

    assert run.latency_ms_p50 == pytest.approx(statistics.median(latencies))
    assert run.latency_ms_avg == pytest.approx(statistics.mean(latencies))


@pytest.mark.parametrize(
    "audit_filter",
    [
        AuditFilter(dag_id="views_a"),
        AuditFilter(dag_id="views_a", run_id="run-1", task_id="ask"),
        AuditFilter(model="large"),
        AuditFilter(decision="deny"),
        AuditFilter(action="model.call"),
    ],
    ids=["dag", "dag-run-task", "model", "denials", "action"],
)
def test_filters_narrow_the_records_every_summary_is_built_from(store_engine, views, audit_filter):
    fill_through_governor(store_engine)
    kept = [r for r in all_records(store_engine) if matches(r, audit_filter)]
    assert kept, "the filter must match something for the test to mean anything"

    page = views.runs(audit_filter)

    by_run: dict[tuple[str | None, str | None], list[StoredAuditRecord]] = {}
    for record in kept:
        by_run.setdefault((record.dag_id, record.run_id), []).append(record)
    assert {(r.dag_id, r.run_id) for r in page.runs} == set(by_run)
    for run in page.runs:
        assert actual_run(run) == expected_run(by_run[(run.dag_id, run.run_id)])
    assert page.totals.records == len(kept)


def appended_runs(store: AuditStore, count: int, start: datetime) -> list[AuditRecord]:
    records = [
        AuditRecord(
            time=start + timedelta(minutes=10 * i), dag_id="views_paged", run_id=f"run-{i}", action="x"
        )
        for i in range(count)
    ]
    store.append_many(records)
    return records


def test_runs_are_paged_with_the_newest_activity_first(store_engine, views):
    records = appended_runs(views.audit, 5, datetime(2026, 3, 1, 8, 0, tzinfo=UTC))
    newest_first = [r.run_id for r in sorted(records, key=lambda r: r.time, reverse=True)]

    first, second, rest = (views.runs(limit=2, offset=o) for o in (0, 2, 4))

    assert [r.run_id for r in first.runs + second.runs + rest.runs] == newest_first
    assert first.totals.runs == second.totals.runs == len(records)
    assert views.runs(limit=2, offset=10).runs == []


def test_a_time_window_keeps_since_and_drops_until(store_engine, views):
    records = appended_runs(views.audit, 4, datetime(2026, 3, 1, 8, 0, tzinfo=UTC))
    window = AuditFilter(since=records[1].time, until=records[3].time)

    page = views.runs(window)

    assert {r.run_id for r in page.runs} == {r.run_id for r in records if matches_window(r, window)}
    assert {r.run_id for r in page.runs} == {records[1].run_id, records[2].run_id}


def matches_window(record: AuditRecord, f: AuditFilter) -> bool:
    assert f.since is not None and f.until is not None
    return f.since <= record.time < f.until


# -- records -----------------------------------------------------------------------------------------------


def test_record_pages_are_the_store_query_newest_first(store_engine, views):
    fill_through_governor(store_engine)
    store = AuditStore(store_engine)
    expected = [r.seq for r in store.query(dag_id="views_a", limit=None, order="desc")]

    pages = [
        views.records(AuditFilter(dag_id="views_a"), limit=4, offset=o) for o in range(0, len(expected), 4)
    ]

    assert [r.seq for page in pages for r in page.records] == expected
    assert {page.total for page in pages} == {len(expected)}
    denial = next(r for page in pages for r in page.records if r.action == "budget.deny")
    stored = next(r for r in store.query(action="budget.deny", limit=None))
    assert (denial.rule, denial.error, denial.hash) == (stored.rule, stored.error, stored.hash)
    assert denial.error and "views-per-run" in denial.error


def test_long_content_is_cut_to_a_preview_and_marked(store_engine, views):
    long_text = "redacted words " * 200
    views.audit.append(AuditRecord(action="model.call", content=long_text, extra={"attempts": 2}))
    views.audit.append(AuditRecord(action="model.call", content="short"))

    short, long = views.records().records

    assert (short.content, short.content_truncated) == ("short", False)
    assert long.content == long_text[:CONTENT_PREVIEW_CHARS] and long.content_truncated
    assert long.extra == {"attempts": 2}


# -- spend -------------------------------------------------------------------------------------------------


def test_spend_is_bucketed_by_utc_day_and_hour_per_dag(store_engine, views):
    new_york = timezone(timedelta(hours=-5))
    moments = [
        ("views_a", datetime(2026, 4, 1, 9, 15, tzinfo=UTC), 0.002, 100, 20),
        ("views_a", datetime(2026, 4, 1, 9, 45, tzinfo=UTC), 0.004, 50, 10),
        ("views_b", datetime(2026, 4, 1, 10, 5, tzinfo=UTC), 0.010, 300, 30),
        # 21:30 in New York is 02:30 UTC the next day: buckets are UTC.
        ("views_a", datetime(2026, 4, 1, 21, 30, tzinfo=new_york), 0.001, 10, 1),
    ]
    for dag_id, when, cost, prompt, completion in moments:
        views.audit.append(
            AuditRecord(
                time=when,
                dag_id=dag_id,
                action="model.call",
                cost_usd=cost,
                prompt_tokens=prompt,
                completion_tokens=completion,
            )
        )
    views.audit.append(
        AuditRecord(time=moments[0][1], dag_id="views_a", action="model.authorize")
    )  # no usage

    for bucket, pattern in (("day", "%Y-%m-%d"), ("hour", "%Y-%m-%dT%H:00")):
        expected: dict[tuple[str, str], list[Any]] = {}
        for dag_id, when, cost, prompt, completion in moments:
            point = expected.setdefault((when.astimezone(UTC).strftime(pattern), dag_id), [0.0, 0, 0])
            point[0] += cost
            point[1] += prompt + completion
            point[2] += 1
        series = views.spend(bucket=bucket)
        actual = {(p.bucket, p.dag_id): [p.cost_usd, p.total_tokens, p.model_calls] for p in series.points}
        assert actual == {key: [pytest.approx(v[0]), v[1], v[2]] for key, v in expected.items()}, bucket
        assert [p.bucket for p in series.points] == sorted(p.bucket for p in series.points)
        assert not series.truncated


def test_spend_beyond_the_cap_keeps_the_newest_points(store_engine, views):
    start = datetime(2026, 5, 1, tzinfo=UTC)
    for day in range(5):
        views.audit.append(
            AuditRecord(time=start + timedelta(days=day), dag_id="d", action="model.call", cost_usd=1.0)
        )

    series = views.spend(bucket="day", max_points=3)

    assert series.truncated
    assert [p.bucket for p in series.points] == [
        (start + timedelta(days=d)).strftime("%Y-%m-%d") for d in (2, 3, 4)
    ]


# -- budgets -----------------------------------------------------------------------------------------------


def test_budget_usage_per_period_with_history_and_fractions(store_engine, views):
    now = [datetime(2026, 6, 1, 12, tzinfo=UTC)]
    ledger = BudgetLedger(store_engine, clock=lambda: now[0])
    spent = {"2026-06-01": (120, 0.3), "2026-06-02": (300, 0.1), "2026-06-03": (50, 0.05)}
    for day, (tokens, cost) in spent.items():
        key = BudgetKey(budget="daily", period=day, max_tokens=1000, max_cost_usd=0.5, period_kind="day")
        hold = ledger.reserve([key], tokens=tokens + 10, cost_usd=cost, holder="t", ttl_seconds=600)
        ledger.settle(hold.id, tokens=tokens, cost_usd=cost)
        now[0] += timedelta(days=1)
    third_day = BudgetKey(
        budget="daily", period="2026-06-03", max_tokens=1000, max_cost_usd=0.5, period_kind="day"
    )
    open_hold = ledger.reserve([third_day], tokens=200, cost_usd=0.1, holder="t", ttl_seconds=600)
    ledger.reserve(
        [BudgetKey(budget="per-run", period="run-7", max_tokens=300)],
        tokens=30,
        cost_usd=0,
        holder="t",
        ttl_seconds=600,
    )

    history = views.budgets(history=2)

    daily = [u for u in history if u.budget == "daily"]
    assert [u.period for u in daily] == ["2026-06-02", "2026-06-03"]  # the two latest, oldest first
    latest = daily[-1]
    assert (latest.spent_tokens, latest.reserved_tokens) == (50, open_hold.tokens)
    assert latest.used_tokens_fraction == pytest.approx((50 + open_hold.tokens) / 1000)
    assert latest.used_cost_fraction == pytest.approx((0.05 + open_hold.cost_usd) / 0.5)
    assert latest.max_cost_usd == pytest.approx(0.5)
    (run_budget,) = views.budgets(period="run-7")
    assert (run_budget.budget, run_budget.reserved_tokens, run_budget.max_cost_usd) == ("per-run", 30, None)
    assert run_budget.used_cost_fraction is None
    assert [u.period for u in views.budgets(budget="daily", history=5)] == list(spent)


# -- chain -------------------------------------------------------------------------------------------------


def test_chain_status_is_reused_for_a_while_and_sees_tampering_when_refreshed(store_engine, tmp_path):
    clock = [1000.0]
    anchors = AnchorLog(tmp_path / "anchors")
    views = AuditViews(
        store_engine, key=KEY, anchors=anchors, verify_max_age_seconds=30, clock=lambda: clock[0]
    )
    fill_through_governor(store_engine, AuditStore(store_engine, key=KEY, anchors=anchors))
    first = views.chain_status()
    assert first.ok and first.records_checked == len(all_records(store_engine))

    with store_engine.begin() as connection:  # edit a stored row behind the store's back
        connection.execute(update(audit_table).where(audit_table.c.seq == 3).values(cost_usd=0.0))

    assert views.chain_status() == first  # still within the reuse window
    refreshed = views.chain_status(refresh=True)
    assert not refreshed.ok and refreshed.first_bad_seq == 3 and "row edited" in (refreshed.problem or "")
    clock[0] += 31
    assert views.chain_status().checked_at > first.checked_at


def test_chain_status_is_not_ok_when_it_cannot_check(store_engine, tmp_path, monkeypatch):
    anchors = AnchorLog(tmp_path / "anchors")
    fill_through_governor(store_engine, AuditStore(store_engine, key=KEY, anchors=anchors))

    no_key = AuditViews(store_engine, anchors=anchors, verify_max_age_seconds=0).chain_status()
    assert (no_key.ok, no_key.status) == (False, "unverifiable")
    no_anchors = AuditViews(store_engine, key=KEY, verify_max_age_seconds=0).chain_status()
    assert (no_anchors.ok, no_anchors.status) == (False, "unanchored")

    failing = AuditViews(store_engine, key=KEY, anchors=anchors, verify_max_age_seconds=0)

    def fake_verify_that_fails() -> None:
        raise OSError("anchor disk unmounted")

    monkeypatch.setattr(failing.audit, "verify", fake_verify_that_fails)
    error = failing.chain_status()
    assert (error.ok, error.status) == (False, "error")
    assert error.problem == "verification failed: OSError: anchor disk unmounted"


# -- options and validation --------------------------------------------------------------------------------


def test_filter_options_are_the_distinct_values_in_the_trail(store_engine, views):
    fill_through_governor(store_engine)
    records = all_records(store_engine)

    options = views.options()
    for_dag = views.options(dag_id="views_b")

    assert options.dag_ids == sorted({r.dag_id for r in records if r.dag_id})
    assert options.task_ids == sorted({r.task_id for r in records if r.task_id})
    assert options.models == sorted({r.model for r in records if r.model})
    assert options.actions == sorted({r.action for r in records})
    of_b = [r for r in records if r.dag_id == "views_b"]
    assert for_dag.dag_ids == ["views_b"]
    assert for_dag.task_ids == sorted({r.task_id for r in of_b if r.task_id})
    assert for_dag.models == sorted({r.model for r in of_b if r.model})
    assert for_dag.actions == sorted({r.action for r in of_b})
    assert for_dag.models != options.models, "the scenario must have models outside views_b"


def test_bad_windows_and_pages_are_refused_with_what_to_change(views):
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="'since' .* must be before 'until'"):
        AuditFilter(since=moment, until=moment)
    with pytest.raises(ValueError, match="limit must be between 1 and 200"):
        views.runs(limit=201)
    with pytest.raises(ValueError, match="offset must not be negative"):
        views.records(offset=-1)
    with pytest.raises(ValueError, match="history must be between"):
        views.budgets(history=0)
