"""Runs one LLMBatchOperator task in its own process, so a test can SIGKILL it mid-batch.

Usage: ``python -m tests.reliability.batch_task_process SPEC_JSON``, with the environment already set
(``AIRFLOW_HOME``, the policy and store settings, ``AIRFLOW_CONN_TEST_LLM``). SPEC_JSON names the item
count, the concurrency, the try number and where to write the task's XCom value if it gets that far.
The task context is a named fake (see tests/reliability/support.py), as in the other execute() tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    from governed_ai.operators.batch import LLMBatchOperator
    from tests.reliability.support import TASK_ID, TEMPLATE, items, task_context

    prefix = spec.get("item_prefix", "item")
    op = LLMBatchOperator(
        task_id=TASK_ID,
        items=[{**row, "id": row["id"].replace("item", prefix)} for row in items(spec["items"])],
        key_field="id",
        prompt_template=TEMPLATE,
        model="fake-model",
        max_tokens=8,
        concurrency=spec["concurrency"],
        budget_block_size=spec.get("budget_block_size", 16),
        on_budget_exhausted=spec.get("on_budget_exhausted", "fail"),
        max_xcom_items=spec["items"],
        llm_conn_id="test_llm",
    )
    context = task_context(try_number=spec["try_number"], dag_id=spec.get("dag_id"))
    xcom = op.execute(context)  # type: ignore[arg-type]
    Path(spec["xcom_path"]).write_text(json.dumps(xcom))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
