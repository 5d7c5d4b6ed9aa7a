"""Test DAG for the multi-worker test: one 2,000-item batch that the test kills mid-way (a whole worker).

Not an example: it lives in a test-only DAGs folder that the test adds as a second DAG bundle. Items carry
``[key=...]`` so that the fault-injecting fake server counts each item's paid completions.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag

from governed_ai.operators.batch import LLMBatchOperator

ITEMS = 2000
CONCURRENCY = 4


@dag(
    dag_id="mw_kill_batch",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["governed-ai", "multi-worker-test"],
    default_args={"owner": "mw-test", "retries": 1, "retry_delay": timedelta(seconds=2)},
)
def mw_kill_batch() -> None:
    LLMBatchOperator(
        task_id="classify",
        items=[{"id": f"k-{i:04d}", "text": f"ticket {i}"} for i in range(ITEMS)],
        key_field="id",
        prompt_template="Classify [key={{ item.id }}]: {{ item.text }}",
        model="smollm2",
        max_tokens=8,
        concurrency=CONCURRENCY,
        progress_interval_seconds=5,
    )


mw_kill_batch()
