"""SIGKILL a batch task mid-run, run it again: the results are complete, and the server saw each item's
successful completion once, except for at most ``concurrency`` items that were in flight at the kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.batch import LLMBatchOperator
from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer
from tests.reliability.support import (
    DAG_ID,
    TASK_ID,
    TEMPLATE,
    audited_items,
    items,
    journaled_keys,
    policy,
    task_context,
)

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]
ITEMS = 400
CONCURRENCY = 8
KILL_AFTER_JOURNALED = 60
# 50 ms per reply at concurrency 8 is at most 160 items/s: the batch runs for seconds, long enough to
# be killed in the middle. Some faults too, so retries are in flight when the kill comes.
SERVER = FaultConfig(
    latency_ms=50, fault_rate=0.1, seed=5, kinds=("429", "500", "malformed"), retry_after_s=0.02
)


@pytest.fixture
def server(governance_policy, monkeypatch) -> Iterator[FaultyFakeOpenAIServer]:
    governance_policy(policy(budget_tokens=10_000_000))
    with FaultyFakeOpenAIServer(SERVER) as fake:
        monkeypatch.setenv("AIRFLOW_CONN_TEST_LLM", fake.connection_json(timeout=10))
        yield fake


def wait_for(condition, what: str, timeout_s: float = 60.0, poll_s: float = 0.01):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_mid_batch_then_retried_nothing_lost_repeats_bounded_by_concurrency(server, tmp_path):
    store = create_engine(os.environ["AIRFLOW__GOVERNED_AI__STORE_URL"])
    spec = {
        "items": ITEMS,
        "concurrency": CONCURRENCY,
        "try_number": 1,
        "xcom_path": str(tmp_path / "x.json"),
    }
    task = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.batch_task_process", json.dumps(spec)],
        cwd=REPO,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def enough_journaled() -> bool:
            if task.poll() is not None:
                raise AssertionError(
                    f"the task process ended before the kill: {task.stderr.read()[-2000:]!r}"
                )
            try:
                return len(journaled_keys(store)) >= KILL_AFTER_JOURNALED
            except Exception:  # the table does not exist until the task has started
                return False

        wait_for(enough_journaled, f"{KILL_AFTER_JOURNALED} journaled items")
        task.send_signal(signal.SIGKILL)
        assert task.wait(timeout=30) == -signal.SIGKILL
    finally:
        if task.poll() is None:
            task.kill()
            task.wait()
    assert not Path(spec["xcom_path"]).exists()  # it really died mid-batch

    # Let requests of the dead process that the server still holds finish, then take stock.
    wait_for(lambda: server.stats()["in_flight"] == 0, "the server to finish in-flight requests")
    served_before = {k for k, n in server.stats()["successes"].items() if n}
    journaled_before = journaled_keys(store)
    assert KILL_AFTER_JOURNALED <= len(journaled_before) < ITEMS
    assert journaled_before <= served_before  # nothing is journaled that the server did not serve
    in_flight_at_kill = served_before - journaled_before  # paid for, not yet durable: repeated by the retry
    assert len(in_flight_at_kill) <= CONCURRENCY

    # Airflow's retry of the task: try 2 of the same task instance, in this process.
    retry = LLMBatchOperator(
        task_id=TASK_ID,
        items=items(ITEMS),
        key_field="id",
        prompt_template=TEMPLATE,
        model="fake-model",
        max_tokens=8,
        concurrency=CONCURRENCY,
        llm_conn_id="test_llm",
        max_xcom_items=ITEMS,
    )
    xcom = retry.execute(task_context(try_number=2))  # type: ignore[arg-type]

    results = xcom["results"]
    assert [r["key"] for r in results] == [i["id"] for i in items(ITEMS)]
    assert {r["status"] for r in results} <= {"ok", "replayed"}
    assert {r["key"] for r in results if r["status"] == "replayed"} == journaled_before
    assert all(r["content"] == f"positive [key={r['key']}]" for r in results)

    successes = server.stats()["successes"]
    assert set(successes) == {i["id"] for i in items(ITEMS)}
    repeated = {k for k, n in successes.items() if n > 1}
    assert max(successes.values()) <= 2
    assert repeated == in_flight_at_kill  # exactly the items in flight at the kill were paid for twice
    assert len(repeated) <= CONCURRENCY
    assert journaled_keys(store) == set(successes)

    # No lost spend: the killed try's holds were settled with what its finished calls spent, the calls it
    # left in flight were charged as paid when they were repeated, and nothing is held after the retry.
    audit = GovernanceHook().governor.audit
    (budget,) = GovernanceHook().governor.ledger.status()
    assert budget.reserved_tokens == 0
    tokens = server.stats()["tokens"]
    in_doubt = audited_items(
        audit.query(action="model.call", dag_id=DAG_ID, limit=None), set(tokens), "in_doubt"
    )
    assert in_flight_at_kill <= in_doubt and len(in_doubt) <= CONCURRENCY
    # A call in flight at the kill is charged as paid (a provider bills what it received); those the server
    # had not served yet (in a retry's back-off at the kill) are the only tokens beyond what it served.
    unserved = in_doubt - served_before
    assert budget.spent_tokens == sum(tokens.values()) + sum(tokens[key] for key in unserved)

    calls = audit.query(action="model.call", dag_id=DAG_ID, limit=None)
    retried_calls = [r for r in calls if r.try_number == 2]
    assert len(retried_calls) == ITEMS - len(journaled_before)
    # Every call of the killed try whose result was journaled is in the audit trail too.
    audited_before = audited_items(
        [r for r in calls if r.try_number == 1 and r.outcome == "ok"], set(successes)
    )
    assert journaled_before <= audited_before
    assert audit.verify().ok
    store.dispose()
