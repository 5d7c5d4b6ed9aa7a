"""Nightly ticket labels with the governed response cache: unchanged tickets are not paid for again.

What it shows: a scheduled batch that re-labels the same support tickets every night. The policy rule
``nightly-ticket-labels`` turns the response cache on for this DAG's structured replies (``cache:
{models: ["smollm2*"], ttl_seconds: 172800, outputs: structured}``), so the first night pays for every
ticket and stores each (redacted) reply in the governance store; the next night asks the same questions
(same tickets, same prompt version, same model and settings) and gets the answers from the store:
every request still authorized against the policy of now, nothing reserved or sent, $0, each audited
as ``model.cache_hit``. A changed ticket, a new prompt version or a revoked grant is paid for (or denied)
as usual. ``report`` prints what the night paid for; ``governed-ai cache status`` and ``governed-ai cache
purge --older-than 7d | --prompt-version V`` manage what is stored.

Caching is the deployment's decision: the DAG has no parameter that could turn it on.

Runs offline against the local model (``governed-ai-local-model start``); SmolLM2-135M's labels are the
same as ``support_triage``'s (its sentiment is right on these tickets, its summaries short).
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task

from governed_ai.operators.batch import LLMBatchOperator

try:
    from support_common import DATA_FILE, SYSTEM_PROMPT, TicketClassification
except ImportError:  # imported from the repository root (tests, IDEs)
    from example_dags.support_common import DATA_FILE, SYSTEM_PROMPT, TicketClassification


@dag(
    dag_id="nightly_ticket_labels",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["governed-ai", "example", "nightly"],
    default_args={"owner": "support-ai", "retries": 1},
    doc_md=__doc__,
)
def nightly_ticket_labels() -> None:
    labels = LLMBatchOperator(
        task_id="label_tickets",
        input_path=str(DATA_FILE),
        key_field="ticket_id",
        prompt_template="Ticket: {{ item.text | tojson }}",
        system_prompt=SYSTEM_PROMPT,
        prompt_name="ticket-labels",
        prompt_version_label="1",
        output_schema=TicketClassification,
        temperature=0.0,
        max_tokens=120,
        concurrency=2,  # the local model serves one request at a time
        max_failure_rate=0.25,
    )

    @task
    def report(result: dict[str, Any]) -> dict[str, Any]:
        summary = result["summary"]
        hits = summary.get("cache_hits", 0)
        night = {
            "tickets": summary["total"],
            "answered_from_cache": hits,
            "paid_items": summary["ok"] - hits,
            "cost_usd": result["cost_usd"],
            "cache": result["governance"].get("cache"),
        }
        print(
            f"{night['tickets']} tickets: {hits} answered from the response cache, "
            f"{night['paid_items']} paid for; ${night['cost_usd']:.6f}"
        )
        return night

    report(labels.output)


nightly_ticket_labels()
