"""Two batches racing on one daily token budget, in two processes, on SQLite and a real PostgreSQL, against
the fake server that counts the tokens it served: they use at least 95% of the budget before stopping, the
ledger never goes over, and it equals what the server served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.sqlstore import create_store_engine
from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer
from tests.reliability.support import DAG_ID, policy

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]
LIMIT = 3_000
ITEMS = 200  # per batch: together far more than the budget holds


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'race.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))


@pytest.fixture
def server(store: str, governance_policy, monkeypatch) -> Iterator[FaultyFakeOpenAIServer]:  # type: ignore[no-untyped-def]
    governance_policy(policy(budget_tokens=LIMIT))
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", store)
    with FaultyFakeOpenAIServer(FaultConfig(latency_ms=10)) as fake:
        monkeypatch.setenv("AIRFLOW_CONN_TEST_LLM", fake.connection_json(timeout=10))
        yield fake


def race(tmp_path: Path, block_size: int) -> list[dict[str, Any]]:
    processes = []
    for name in ("a", "b"):
        spec = {
            "items": ITEMS,
            "concurrency": 4,
            "try_number": 1,
            "dag_id": f"{DAG_ID}_{name}",
            "item_prefix": f"{name}-item",
            "budget_block_size": block_size,
            "on_budget_exhausted": "succeed",
            "xcom_path": str(tmp_path / f"{name}.json"),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.batch_task_process", json.dumps(spec)],
                cwd=REPO,
                env=dict(os.environ),
                stderr=subprocess.PIPE,
            )
        )
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-3000:]
    return [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b")]


def test_two_racing_batches_use_the_budget_up_and_never_overspend(server, store, tmp_path):
    results = race(tmp_path, block_size=16)
    engine = create_store_engine(store)
    try:
        (status,) = BudgetLedger(engine).status()
    finally:
        engine.dispose()
    served = sum(server.stats()["tokens"].values())
    assert status.spent_tokens <= LIMIT
    assert status.reserved_tokens == 0
    assert status.spent_tokens == served  # the ledger is what the provider billed
    assert status.spent_tokens >= 0.95 * LIMIT, f"only {status.spent_tokens / LIMIT:.1%} of the budget used"
    for xcom in results:
        summary = xcom["summary"]
        assert summary["ok"] > 0 and summary["stopped_by_budget"]
        assert all("Budget exhausted" in row["error"] for row in xcom["failures"])
        assert summary["ok"] + summary["not_run"] == ITEMS
