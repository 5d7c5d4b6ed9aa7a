"""Test DAG for the multi-worker test: two batches at once, one pinned to each Celery worker's queue,
throttled so that they are still running when the test revokes their grant in the policy."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from governed_ai.operators.batch import LLMBatchOperator

ITEMS = 400
CONCURRENCY = 2
REQUESTS_PER_MINUTE = 900  # 15 calls/s each: about 27 s for the whole batch if nothing stops it


@dag(
    dag_id="mw_revoke",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["governed-ai", "multi-worker-test"],
    default_args={"owner": "mw-test", "retries": 0},
)
def mw_revoke() -> None:
    for worker in ("a", "b"):
        LLMBatchOperator(
            task_id=f"on_{worker}",
            queue=f"worker_{worker}",
            items=[{"id": f"r{worker}-{i:04d}"} for i in range(ITEMS)],
            key_field="id",
            prompt_template="Label [key={{ item.id }}]",
            model="smollm2",
            max_tokens=8,
            concurrency=CONCURRENCY,
            requests_per_minute=REQUESTS_PER_MINUTE,
            progress_interval_seconds=5,
        )


mw_revoke()
