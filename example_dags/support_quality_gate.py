"""Support quality gate: a nightly batch classification whose outputs must pass a quality gate.

What it shows: model outputs are data, and data gets validated before anyone downstream trusts it.

- ``load_tickets`` reads the day's tickets (``data/support_messages.jsonl``).
- ``classify`` asks the model, once per ticket (a mapped ``LLMOperator``), for a schema-validated
  ``TicketClassification``. Governance applies as in ``support_triage``: the ``support-triage`` rule grants
  the model (owner ``support-ai``, tag ``support``), the support budgets are charged, outputs are redacted.
- ``quality_gate`` runs a Great Expectations suite over all the outputs at once (the sentiment is an
  allowed label, the summary is present, 12 to 160 characters, holds no personal data or secrets and is not
  a refusal, the raw reply conforms to the schema) with the **quarantine** outcome: rows that fail go
  aside with their reasons, the others continue. The run is recorded in the audit trail and, with the
  OpenLineage provider, as data-quality assertions on the dataset.
- ``route`` branches: ``write_results`` always writes the passing rows; ``write_quarantine`` runs only
  when rows were quarantined and writes them, with the reasons, for a human to review. Both files go to
  ``$AIRFLOW_HOME/governed_ai/outputs/support_quality_gate/``.

With the small local model (SmolLM2-135M) the JSON always fits the schema, the sentiment on these tickets
is usually right, and summaries are short and sometimes too short or odd: exactly what a gate is for.
Point the ``governed_ai_llm_default`` connection at a larger model and fewer rows are quarantined.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import dag, task

from governed_ai.core.paths import provider_home
from governed_ai.core.validation import (
    ValidationSuite,
    conforms_to_schema,
    label_in_set,
    length_between,
    load_rows,
    no_pii,
    not_empty,
    not_refusal,
    write_jsonl,
)
from governed_ai.operators.llm import LLMOperator
from governed_ai.operators.quality import LLMOutputQualityOperator

try:
    from support_common import DATA_FILE, SYSTEM_PROMPT, TicketClassification, read_tickets
except ImportError:  # imported from the repository root (tests, IDEs)
    from example_dags.support_common import DATA_FILE, SYSTEM_PROMPT, TicketClassification, read_tickets

SUITE = ValidationSuite(
    name="support_ticket_classification",
    description="What a ticket classification must satisfy before the support tools consume it.",
    checks=[
        conforms_to_schema("content", model=TicketClassification, name="reply_fits_schema"),
        label_in_set("sentiment", ["negative", "positive"]),
        not_empty("summary"),
        length_between("summary", min_length=12, max_length=160),
        no_pii("summary"),
        not_refusal("summary"),
    ],
)


def output_dir() -> Path:
    return provider_home() / "outputs" / "support_quality_gate"


def _file_stem(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", run_id)


@dag(
    dag_id="support_quality_gate",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["governed-ai", "support", "example"],
    default_args={"owner": "support-ai", "retries": 1},
    doc_md=__doc__,
)
def support_quality_gate() -> None:
    @task
    def load_tickets() -> list[dict[str, str]]:
        tickets = read_tickets()
        print(f"loaded {len(tickets)} tickets from {DATA_FILE.name}")
        return tickets

    tickets = load_tickets()

    classify = LLMOperator.partial(
        task_id="classify",
        system_prompt=SYSTEM_PROMPT,
        output_schema=TicketClassification,
        temperature=0.0,
        max_tokens=120,
        max_repair_attempts=2,
    ).expand(prompt=tickets.map(lambda t: f"Ticket: {json.dumps(t['text'])}"))

    quality_gate = LLMOutputQualityOperator(
        task_id="quality_gate",
        suite=SUITE,
        rows=classify.output,
        input_format="llm_results",  # each row: the parsed fields plus the raw reply as "content"
        inputs=tickets,  # ... plus the ticket it came from (ticket_id, text)
        outcome="quarantine",
    )

    @task.branch
    def route(gate: dict[str, Any]) -> list[str]:
        report = gate["report"]
        print(f"{report['passed_rows']} rows passed, {report['quarantined_rows']} quarantined")
        return ["write_results", "write_quarantine"] if report["quarantined_rows"] else ["write_results"]

    @task
    def write_results(gate: dict[str, Any], **context: Any) -> str:
        rows = load_rows(gate["passed"])
        path = output_dir() / f"{_file_stem(str(context['run_id']))}.results.jsonl"
        keep = ("ticket_id", "sentiment", "summary")
        write_jsonl(path, ({key: row.get(key) for key in keep} for row in rows))
        print(f"wrote {len(rows)} validated classifications to {path}")
        return str(path)

    @task
    def write_quarantine(**context: Any) -> str:
        quarantined = load_rows(context["ti"].xcom_pull(task_ids="quality_gate", key="quarantined"))
        path = output_dir() / f"{_file_stem(str(context['run_id']))}.quarantine.jsonl"
        write_jsonl(path, quarantined)
        for item in quarantined:
            print(f"{item['row'].get('ticket_id')}: {'; '.join(item['reasons'])}")
        print(f"wrote {len(quarantined)} quarantined rows to {path} for review")
        return str(path)

    branch = route(quality_gate.output)
    branch >> [write_results(quality_gate.output), write_quarantine()]


support_quality_gate()
