"""One 'worker process' for the multi-worker race test: ingest the same documents, then spend the budget.

Run as ``python -m tests.production.race_worker NAME START_AT``; the environment carries the policy, the
governance store (PostgreSQL), the Chroma server and the LLM connection. Prints a JSON summary.
"""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

from airflow.sdk.exceptions import AirflowFailException

from governed_ai.operators.chroma import ChromaIngestOperator
from governed_ai.operators.llm import LLMOperator

DOCUMENTS = [
    {"text": f"Knowledge article {i}: how to handle case {i} for region {i % 5}.", "source": f"kb-{i}.md"}
    for i in range(40)
]


def context(name: str, task_id: str) -> dict:
    """The task identity governance reads (a named fake: the worker calls ``execute`` directly)."""
    ti = SimpleNamespace(
        dag_id="race_dag", task_id=task_id, run_id="scheduled__race", try_number=1, map_index=-1
    )
    return {"ti": ti, "task": SimpleNamespace(owner=name), "dag": SimpleNamespace(tags=())}


def main() -> None:
    name, start_at = sys.argv[1], float(sys.argv[2])
    while time.time() < start_at:  # both workers begin together
        time.sleep(0.005)
    ingest = ChromaIngestOperator(task_id="ingest", collection="kb_race", documents=DOCUMENTS, batch_size=8)
    report = ingest.execute(context(name, "ingest"))
    calls, tokens, denied = 0, 0, None
    while denied is None and calls < 500:
        op = LLMOperator(
            task_id="enrich", prompt=f"item {calls} from {name}", model="fake-model", max_tokens=20
        )
        try:
            result = op.execute(context(name, "enrich"))
        except AirflowFailException as error:
            denied = str(error)
            break
        calls += 1
        tokens += result["usage"]["total_tokens"]
    print(json.dumps({"name": name, "calls": calls, "tokens": tokens, "denied": denied, "ingest": report}))


if __name__ == "__main__":
    main()
