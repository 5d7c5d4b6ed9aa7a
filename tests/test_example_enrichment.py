"""The budget-capped enrichment DAG stops cleanly when the day's budget is spent and resumes the next day."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

EXAMPLE_DAGS = Path(__file__).resolve().parent.parent / "example_dags"
DAILY_TOKENS = 2000


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(EXAMPLE_DAGS))


@pytest.mark.airflow
@pytest.mark.real_model
def test_enrichment_stops_at_the_budget_and_resumes_the_next_day(airflow_db, local_model_connection, dagbag):
    from airflow.utils.state import DagRunState

    import example_dags.catalog_enrichment as module
    from governed_ai.core.ledger import BudgetLedger
    from governed_ai.hooks.governance import GovernanceHook

    governor = GovernanceHook().governor
    real_clock = governor.clock
    products = len(module.PRODUCTS.read_text().splitlines())
    try:
        day_one = datetime.now(UTC)
        governor.clock = lambda: day_one  # a named fake clock: "tonight" and "tomorrow night"
        assert dagbag.dags["catalog_enrichment"].test().state == DagRunState.SUCCESS
        first = len(module.enriched_skus())
        assert 0 < first < products, "the day's budget should cover some products, not all"

        assert dagbag.dags["catalog_enrichment"].test().state == DagRunState.SUCCESS  # same day: nothing left
        assert len(module.enriched_skus()) == first

        governor.clock = lambda: day_one + timedelta(days=1)
        assert dagbag.dags["catalog_enrichment"].test().state == DagRunState.SUCCESS
        second = len(module.enriched_skus())
        assert second > first
    finally:
        governor.clock = real_clock

    rows = [json.loads(line) for line in module.enriched_file().read_text().splitlines()]
    assert len({r["sku"] for r in rows}) == len(rows) == second  # nobody enriched twice
    for row in rows:
        module.ProductBlurb.model_validate({"blurb": row["blurb"]})
    spent = {
        s.period: s for s in BudgetLedger(governor.audit.engine).status() if s.budget == "enrichment-daily"
    }
    assert len(spent) == 2
    for status in spent.values():
        assert status.spent_tokens <= DAILY_TOKENS and status.reserved_tokens == 0
