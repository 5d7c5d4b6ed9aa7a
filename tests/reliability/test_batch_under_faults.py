"""A 1,000-item batch against a server that fails 20% of requests (429 with Retry-After, 500, timeouts,
malformed bodies): every item ends ok or failed with a reason; none is lost, none is paid for twice."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.batch import LLMBatchOperator
from tests.fakes.fault_server import FAULT_KINDS, FaultConfig, FaultyFakeOpenAIServer
from tests.reliability.support import (
    DAG_ID,
    TASK_ID,
    TEMPLATE,
    audited_items,
    journaled_keys,
    policy,
    task_context,
)

pytestmark = pytest.mark.reliability

ITEMS = 1_000
CONCURRENCY = 32
MAX_ATTEMPTS = 4
CLIENT_TIMEOUT_S = 1.5  # a "timeout" fault holds the reply for longer; normal replies take 5 ms
FAULTS = FaultConfig(latency_ms=5, fault_rate=0.2, seed=7, retry_after_s=0.05, timeout_hold_s=2.5)


@pytest.fixture
def server(governance_policy, monkeypatch, tmp_path) -> Iterator[FaultyFakeOpenAIServer]:
    governance_policy(policy())
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow_home"))
    with FaultyFakeOpenAIServer(FAULTS) as fake:
        monkeypatch.setenv("AIRFLOW_CONN_TEST_LLM", fake.connection_json(timeout=CLIENT_TIMEOUT_S))
        yield fake


def test_a_thousand_items_at_twenty_percent_faults_none_lost_none_duplicated(server, tmp_path):
    rows = [{"id": f"item-{i:04d}", "text": f"ticket text {i}"} for i in range(ITEMS)]
    output = tmp_path / "results.jsonl"
    op = LLMBatchOperator(
        task_id=TASK_ID,
        items=rows,
        key_field="id",
        prompt_template=TEMPLATE,
        model="fake-model",
        max_tokens=8,
        concurrency=CONCURRENCY,
        max_retries=MAX_ATTEMPTS - 1,
        max_failure_rate=0.05,
        output_path=str(output),
        llm_conn_id="test_llm",
    )
    xcom = op.execute(task_context())

    results = [json.loads(line) for line in output.read_text().splitlines()]
    failures = [json.loads(line) for line in Path(xcom["failures_path"]).read_text().splitlines()]
    keys = [r["id"] for r in rows]
    # None lost, none duplicated, input order kept.
    assert [r["key"] for r in results] == keys
    statuses = Counter(r["status"] for r in results)
    assert set(statuses) <= {"ok", "failed"}
    ok = {r["key"] for r in results if r["status"] == "ok"}
    failed = {r["key"] for r in results if r["status"] == "failed"}
    assert all(r["error"] for r in results if r["status"] == "failed")  # every failure has its reason
    assert {f["key"] for f in failures} == failed
    assert len(ok) > ITEMS * 0.99  # 4 attempts at 20% faults: about 0.2**4 of the items run out

    # Each ok item was served successfully exactly once and journaled once; failed ones never succeeded.
    stats = server.stats()
    assert stats["successes"] == dict.fromkeys(ok, 1)
    store = create_engine(GovernanceHook().settings.store_url)
    try:
        assert journaled_keys(store) == ok
    finally:
        store.dispose()
    # The faults really happened, every kind of them, and each retry was one more request.
    assert set(stats["faults"]) == set(FAULT_KINDS)
    assert sum(stats["faults"].values()) > ITEMS * 0.2
    assert stats["chat_requests"] == ITEMS + xcom["summary"]["http_retries"]
    for key in failed:
        assert stats["attempts"][key] == MAX_ATTEMPTS

    # One audit record per item, in an intact chain.
    audit = GovernanceHook().governor.audit
    calls = audit.query(action="model.call", dag_id=DAG_ID, limit=None)
    assert Counter(r.outcome for r in calls) == Counter({"ok": len(ok), "error": len(failed)})
    assert len(calls) == ITEMS
    assert audited_items(calls, set(keys)) == set(keys)  # each item once, named by its digest only
    assert not any(key in json.dumps(r.extra) for r in calls for key in keys[:20])
    assert audit.verify().ok
