"""Test DAGs for the multi-worker test: two DAGs, each pinned to one Celery worker's queue, racing for one
shared daily budget (``mw-race`` in the test's policy). Each alone would overspend it."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from governed_ai.operators.batch import LLMBatchOperator

ITEMS = 400
CONCURRENCY = 2
REQUESTS_PER_MINUTE = 600  # 10 calls/s each, so that the two runs overlap for the whole race


def racer(worker: str) -> None:
    @dag(
        dag_id=f"mw_budget_{worker}",
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        tags=["governed-ai", "multi-worker-test"],
        default_args={"owner": "mw-test", "retries": 0},
    )
    def race() -> None:
        LLMBatchOperator(
            task_id="spend",
            queue=f"worker_{worker}",
            items=[{"id": f"b{worker}-{i:04d}"} for i in range(ITEMS)],
            key_field="id",
            prompt_template="Summarise [key={{ item.id }}] in a word",
            model="smollm2",
            max_tokens=64,  # as catalog_enrichment: replies are usually much shorter than the cap
            concurrency=CONCURRENCY,
            requests_per_minute=REQUESTS_PER_MINUTE,
            max_failure_rate=1.0,  # what the budget leaves undone is expected, not a failure
            progress_interval_seconds=5,
        )

    race()


racer("a")
racer("b")
