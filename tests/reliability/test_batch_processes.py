"""A batch across several processes (``processes=2``) against the fault-injecting server over HTTP: the
results are those of one process (item order, each item paid once), every call is in the one audit chain
and the ledger equals what the server served; a process killed mid-batch fails the task, and the retry
replays what was journaled and repeats at most ``concurrency`` items."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from sqlalchemy import create_engine

from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.batch import LLMBatchOperator
from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer
from tests.reliability.support import (
    DAG_ID,
    TASK_ID,
    TEMPLATE,
    items,
    journaled_keys,
    policy,
    task_context,
)

pytestmark = pytest.mark.reliability

ITEMS = 300
CONCURRENCY = 4
SERVER = FaultConfig(latency_ms=20, fault_rate=0.05, seed=11, kinds=("429", "500"), retry_after_s=0.01)


@pytest.fixture
def server(governance_policy, monkeypatch) -> Iterator[FaultyFakeOpenAIServer]:
    governance_policy(policy(budget_tokens=10_000_000))
    with FaultyFakeOpenAIServer(SERVER) as fake:
        monkeypatch.setenv("AIRFLOW_CONN_TEST_LLM", fake.connection_json(timeout=10, max_retries=6))
        yield fake


def batch(**overrides: Any) -> LLMBatchOperator:
    settings: dict[str, Any] = {
        "task_id": TASK_ID,
        "items": items(ITEMS),
        "key_field": "id",
        "prompt_template": TEMPLATE,
        "model": "fake-model",
        "max_tokens": 8,
        "concurrency": CONCURRENCY,
        "processes": 2,
        "llm_conn_id": "test_llm",
        "max_xcom_items": ITEMS,
        "progress_interval_seconds": 0.2,
    }
    return LLMBatchOperator(**{**settings, **overrides})


def test_two_processes_give_the_results_of_one_each_item_paid_once_in_one_audit_chain(server) -> None:
    xcom = batch().execute(task_context())  # type: ignore[arg-type]

    assert xcom["summary"]["processes"] == 2
    results = xcom["results"]
    assert [r["key"] for r in results] == [i["id"] for i in items(ITEMS)]
    assert {r["status"] for r in results} == {"ok"}
    assert all(r["content"] == f"positive [key={r['key']}]" for r in results)
    stats = server.stats()
    assert stats["successes"] == {i["id"]: 1 for i in items(ITEMS)}
    assert sum(stats["faults"].values()) > 0  # retries really happened, in both processes
    # ``concurrency`` is the task's: the two processes hold 2 + 2 calls in flight, never 4 each.
    assert CONCURRENCY // 2 < stats["peak_in_flight"] <= CONCURRENCY

    governor = GovernanceHook().governor
    calls = governor.audit.query(action="model.call", dag_id=DAG_ID, limit=None)
    assert len(calls) == ITEMS and {c.outcome for c in calls} == {"ok"}
    assert governor.audit.verify().ok
    (budget,) = governor.ledger.status()
    assert budget.reserved_tokens == 0
    assert budget.spent_tokens == sum(stats["tokens"].values())


def batch_children() -> list[psutil.Process]:
    """The forked batch processes: children of this process running this process's command line."""
    me = psutil.Process()
    return [child for child in me.children() if child.cmdline() == me.cmdline()]


def test_a_killed_batch_process_fails_the_task_and_the_retry_replays_what_was_journaled(
    server, tmp_path
) -> None:
    store = create_engine(os.environ["AIRFLOW__GOVERNED_AI__STORE_URL"])
    failure: list[BaseException] = []

    def first_try() -> None:
        try:
            batch().execute(task_context(try_number=1))  # type: ignore[arg-type]
        except BaseException as error:
            failure.append(error)

    runner = threading.Thread(target=first_try)
    runner.start()
    deadline = time.monotonic() + 60
    killed = None
    while killed is None and time.monotonic() < deadline:
        children = batch_children()
        try:
            enough = len(children) == 2 and len(journaled_keys(store)) >= 40
        except Exception:  # the journal table does not exist until the task has started
            enough = False
        if enough:
            killed = children[0]
            os.kill(killed.pid, signal.SIGKILL)
        time.sleep(0.01)
    runner.join(timeout=120)
    assert killed is not None, "the batch processes never got going"
    assert not runner.is_alive()
    (error,) = failure
    assert "batch processes failed" in str(error) and str(killed.pid) in str(error)

    server.reset_stats()
    journaled_before = journaled_keys(store)
    assert 40 <= len(journaled_before) < ITEMS
    xcom = batch().execute(task_context(try_number=2))  # type: ignore[arg-type]
    results = xcom["results"]
    assert [r["key"] for r in results] == [i["id"] for i in items(ITEMS)]
    assert {r["status"] for r in results} == {"ok", "replayed"}
    assert {r["key"] for r in results if r["status"] == "replayed"} == journaled_before
    # The retry paid only for what was not journaled; of that, what the killed process had in flight was
    # served before too (at most its concurrency).
    retried = set(server.stats()["successes"])
    assert retried == {i["id"] for i in items(ITEMS)} - journaled_before
    (budget,) = GovernanceHook().governor.ledger.status()
    assert budget.reserved_tokens == 0  # the dead process's hold was settled by the retry
    assert GovernanceHook().governor.audit.verify().ok
    store.dispose()
