"""BudgetSensor and BudgetTrigger: a batch the daily budget stopped resumes in the same DAG run once the
next day's budget begins. Real Airflow (``dag.test()``, the trigger run inline), a real ledger, and the
fault-injecting fake server counting what it served."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fake_context
from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer

POLICY = """\
version: 1
rules:
  - name: resume
    match: {dag_id: "budget_*"}
    models: [{connection: test_llm, model: fake-model}]
budgets:
  - {name: resume-daily, scope: dag, match: {dag_id: "budget_*"}, period: day, max_tokens: 120}
"""

DAG_FILE = """\
import threading, time
from datetime import datetime, timedelta, UTC
from airflow.sdk import DAG, task
from governed_ai.operators.batch import LLMBatchOperator
from governed_ai.sensors.budget import BudgetSensor

ITEMS = [{"id": f"item-{i}", "text": f"ticket {i}"} for i in range(8)]
TEMPLATE = "Classify [key={{ item.id }}]: {{ item.text }}"

with DAG("budget_resume", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    tonight = LLMBatchOperator(
        task_id="tonight", items=ITEMS, key_field="id", prompt_template=TEMPLATE, model="fake-model",
        max_tokens=40, concurrency=1, budget_block_size=1, llm_conn_id="test_llm",
        on_budget_exhausted="succeed", budget_wait_seconds=0,
    )

    @task
    def midnight_arrives_soon():
        # A named fake clock: "tomorrow" begins two seconds from now, while the sensor waits.
        from governed_ai.hooks.governance import GovernanceHook

        governor = GovernanceHook().governor
        tomorrow = datetime.now(UTC) + timedelta(days=1)

        def later():
            time.sleep(2)
            governor.clock = lambda: tomorrow

        threading.Thread(target=later, daemon=True).start()

    wait = BudgetSensor(task_id="wait_for_budget", min_tokens=70, poke_interval=0.5, timeout=120)

    @task
    def left(result):
        from governed_ai.core.validation.rows import load_rows
        return [{"id": r["key"], "text": r["key"].replace("item-", "ticket ")} for r in load_rows(result)
                if r["status"] == "not_run"]

    rest = LLMBatchOperator(
        task_id="the_rest", items=left(tonight.output), key_field="id", prompt_template=TEMPLATE,
        model="fake-model", max_tokens=40, concurrency=1, llm_conn_id="test_llm",
        on_budget_exhausted="succeed",
    )
    tonight >> midnight_arrives_soon() >> wait >> rest
"""


@pytest.fixture
def server(governance_policy: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    governance_policy(POLICY)
    with FaultyFakeOpenAIServer(FaultConfig(latency_ms=1)) as fake:
        monkeypatch.setenv("AIRFLOW_CONN_TEST_LLM", fake.connection_json())
        yield fake


@pytest.mark.airflow
def test_a_capped_batch_resumes_in_the_same_run_when_the_next_budget_period_begins(
    airflow_db: Path, server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    from governed_ai.hooks.governance import GovernanceHook

    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "budget_resume.py").write_text(DAG_FILE)
    bundle = {
        "name": "budget-tests",
        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
        "kwargs": {"path": str(folder), "refresh_interval": 0},
    }
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([bundle]))
    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    governor = GovernanceHook().governor
    real_clock = governor.clock
    try:
        run = bag.dags["budget_resume"].test()
    finally:
        governor.clock = real_clock
    assert run.state == DagRunState.SUCCESS
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["wait_for_budget"] == "success"
    served = server.stats()["successes"]
    assert sorted(served) == [f"item-{i}" for i in range(8)]  # every item, tonight or tomorrow ...
    assert set(served.values()) == {1}  # ... and each paid for once
    audit = governor.audit
    tonight = audit.query(dag_id="budget_resume", task_id="tonight", action="batch.summary")[0].extra
    assert 0 < tonight["ok"] < 8 and tonight["stopped_by_budget"]
    by_period = {s.period: s.spent_tokens for s in governor.ledger.status() if s.budget == "resume-daily"}
    assert len(by_period) == 2 and all(0 < spent <= 120 for spent in by_period.values())


def test_the_sensor_defers_when_there_is_no_room_and_the_trigger_fires_when_there_is(server: Any) -> None:
    from airflow.providers.common.compat.sdk import TaskDeferred

    from governed_ai.hooks.governance import GovernanceHook
    from governed_ai.sensors.budget import BudgetSensor
    from governed_ai.triggers.budget import BudgetTrigger

    context = fake_context("budget_sensor", "wait")
    governor = GovernanceHook().governor
    subject = GovernanceHook.subject_from_context(context)  # type: ignore[arg-type]
    keys = governor.budget_keys(subject)
    governor.ledger.reserve(keys, tokens=100, cost_usd=0.0, holder="another task", ttl_seconds=600)
    sensor = BudgetSensor(task_id="wait", min_tokens=60, poke_interval=0.05)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context)  # type: ignore[arg-type]
    trigger = deferred.value.trigger
    assert isinstance(trigger, BudgetTrigger)
    classpath, kwargs = trigger.serialize()
    assert classpath == "governed_ai.triggers.budget.BudgetTrigger" and json.dumps(kwargs)

    real_clock = governor.clock

    async def first_event() -> Any:
        async def tomorrow_soon() -> None:
            await asyncio.sleep(0.3)
            day_two = datetime.now(UTC) + timedelta(days=1)
            governor.clock = lambda: day_two

        flip = asyncio.create_task(tomorrow_soon())
        async for event in BudgetTrigger(**kwargs).run():
            await flip
            return event
        return None

    try:
        event = asyncio.run(first_event())
    finally:
        governor.clock = real_clock
    assert event.payload["status"] == "success" and "room for 60 tokens" in event.payload["message"]
    sensor.execute_complete(context, event.payload)  # type: ignore[arg-type]
