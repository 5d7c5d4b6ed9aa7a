"""Nightly support-ticket triage, the flagship job: retrieve, classify in one batch, gate, write.

What it shows, end to end on a real model:

1. ``wait_for_knowledge_base``: a sensor (reschedule mode, no worker slot held) waits until the
   ``kb_support`` collection that ``kb_ingest`` maintains holds the knowledge base.
2. ``retrieve_articles``: each ticket is matched to its closest knowledge-base article (governed read,
   retrieved ids and content hashes audited). The article is attached to the ticket for the support
   agent: routing by retrieval, deterministic and traceable, instead of asking a small model for it.
3. ``classify``: one ``LLMBatchOperator`` task classifies every ticket into a pydantic schema
   (sentiment and a short summary) with bounded concurrency, per-item retries, budgets reserved in
   blocks, batched audit writes and a replay journal: if the task is retried, tickets already classified
   are not paid for again.
4. ``quality_gate``: Great Expectations checks the classifications; failing rows are quarantined with
   their reasons instead of reaching downstream systems.
5. ``write_results``: validated rows go to a JSONL file, quarantined ones to a second file.

Runs offline against the local model (``governed-ai-local-model start``) or against any
OpenAI-compatible endpoint by changing only the ``governed_ai_llm_default`` connection. With
SmolLM2-135M the sentiment is right on these tickets; its summaries are short and sometimes odd, and the
gate quarantines the ones that are too short to be useful.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import dag, task

from governed_ai.core.paths import provider_home
from governed_ai.core.validation import ValidationSuite, label_in_set, length_between, no_pii, not_empty
from governed_ai.core.validation.rows import load_rows
from governed_ai.operators.batch import LLMBatchOperator
from governed_ai.operators.chroma import ChromaQueryOperator
from governed_ai.operators.quality import LLMOutputQualityOperator
from governed_ai.sensors.chroma import ChromaCollectionSensor

try:
    from support_common import DATA_FILE, SYSTEM_PROMPT, TicketClassification, read_tickets
except ImportError:  # imported from the repository root (tests, IDEs)
    from example_dags.support_common import DATA_FILE, SYSTEM_PROMPT, TicketClassification, read_tickets


COLLECTION = "kb_support"

SUITE = ValidationSuite(
    name="support_triage_classification",
    description="What a ticket classification must satisfy before the support tools consume it.",
    checks=[
        not_empty("content"),
        label_in_set("sentiment", ["negative", "positive"]),
        length_between("summary", min_length=12, max_length=160),  # "positive" is not a summary
        no_pii("summary"),
    ],
)


def output_dir() -> Path:
    return provider_home() / "outputs" / "support_triage"


def _file_stem(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", run_id)


@dag(
    dag_id="support_triage",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one run at a time: runs of this job share state (files, a collection, a budget)
    tags=["governed-ai", "support", "example"],
    default_args={"owner": "support-ai", "retries": 1},
    doc_md=__doc__,
)
def support_triage() -> None:
    wait_for_kb = ChromaCollectionSensor(
        task_id="wait_for_knowledge_base",
        collection=COLLECTION,
        min_count=5,
        poke_interval=60,
        timeout=6 * 3600,
    )

    @task
    def load_tickets() -> list[dict[str, str]]:
        tickets = read_tickets()
        print(f"loaded {len(tickets)} tickets from {DATA_FILE.name}")
        return tickets

    @task
    def ticket_texts(tickets: list[dict[str, str]]) -> list[str]:
        return [t["text"] for t in tickets]

    tickets = load_tickets()
    wait_for_kb >> tickets
    articles = ChromaQueryOperator(
        task_id="retrieve_articles", collection=COLLECTION, query=ticket_texts(tickets), n_results=1
    )

    classify = LLMBatchOperator(
        task_id="classify",
        items=tickets,
        key_field="ticket_id",
        prompt_template="Ticket: {{ item.text | tojson }}",
        system_prompt=SYSTEM_PROMPT,
        output_schema=TicketClassification,
        temperature=0.0,
        max_tokens=120,
        max_repair_attempts=2,
        concurrency=2,  # the local model serves one request at a time; a hosted endpoint takes 8-32
        max_failure_rate=0.25,
    )

    quality_gate = LLMOutputQualityOperator(
        task_id="quality_gate",
        suite=SUITE,
        rows=classify.output,
        input_format="llm_results",
        inputs=tickets,
        outcome="quarantine",
    )

    @task
    def write_results(
        tickets: list[dict[str, str]], retrieved: list[dict[str, Any]], gate: dict[str, Any], **context: Any
    ) -> str:
        article_of = {
            t["ticket_id"]: (r["contexts"][0]["source"] if r["contexts"] else None)
            for t, r in zip(tickets, retrieved, strict=True)
        }
        stem = _file_stem(str(context["run_id"]))
        out = output_dir()
        out.mkdir(parents=True, exist_ok=True)
        passed = load_rows(gate["passed"])
        with (out / f"{stem}.jsonl").open("w") as results:
            for row in passed:
                # Validate again at the boundary: what leaves this DAG must fit the schema.
                classification = TicketClassification.model_validate(row)
                record = {"ticket_id": row["ticket_id"], **classification.model_dump()}
                record["kb_article"] = article_of.get(row["ticket_id"])
                results.write(json.dumps(record) + "\n")
                print(f"{row['ticket_id']}: {record}")
        held_back = context["ti"].xcom_pull(task_ids="quality_gate", key="quarantined")
        quarantined = load_rows(held_back) if held_back else []
        with (out / f"{stem}.quarantine.jsonl").open("w") as held:
            for row in quarantined:
                held.write(json.dumps(row, default=str) + "\n")
        print(f"wrote {len(passed)} results to {out / (stem + '.jsonl')}; {len(quarantined)} quarantined")
        return str(out / f"{stem}.jsonl")

    write_results(tickets, articles.output, quality_gate.output)


support_triage()
