"""Nightly support-ticket triage: classify each new ticket into a validated schema with a real model.

What it shows: a scheduled batch job whose every model reply is structured output checked by pydantic
(with repair attempts when the model gets it wrong), with tokens, cost and latency per call in the task
log and XCom, and the run's results written to a JSONL file a downstream system can pick up.

Runs offline against the local model (``governed-ai-local-model start``) or against any
OpenAI-compatible endpoint by changing only the ``governed_ai_llm_default`` connection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pendulum
from airflow.sdk import dag, task
from pydantic import BaseModel, Field

from governed_ai.core.paths import provider_home
from governed_ai.operators.llm import LLMOperator

DATA_FILE = Path(__file__).parent / "data" / "support_messages.jsonl"


class TicketClassification(BaseModel):
    """What the triage team needs first: is the customer unhappy, and what is it about."""

    sentiment: Literal["negative", "positive"] = Field(description="is the customer unhappy or happy")
    summary: str = Field(max_length=160, description="the ticket in a few words")


# Measured with SmolLM2-135M: a short, direct instruction beats category lists and few-shot examples,
# which a model this small copies into its answers. A larger model can take a richer schema.
SYSTEM_PROMPT = (
    "You read customer support tickets. Is the customer unhappy (negative) or happy (positive)? "
    "Then summarise the ticket in a few words."
)


def output_dir() -> Path:
    return provider_home() / "outputs" / "support_triage"


@dag(
    dag_id="support_triage",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["governed-ai", "support", "example"],
    default_args={"owner": "support-ai", "retries": 1},
    doc_md=__doc__,
)
def support_triage() -> None:
    @task
    def load_tickets() -> list[dict[str, str]]:
        tickets = [json.loads(line) for line in DATA_FILE.read_text().splitlines() if line.strip()]
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

    @task
    def write_results(tickets: list[dict[str, str]], results: list[dict[str, Any]], **context: Any) -> str:
        run_id = str(context["run_id"]).replace(":", "_").replace("+", "_")
        path = output_dir() / f"{run_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        total_tokens = 0
        total_cost = 0.0
        with path.open("w") as out:
            for ticket, result in zip(tickets, results, strict=True):
                # Validate again at the boundary: what leaves this DAG must fit the schema.
                TicketClassification.model_validate(result["output"])
                total_tokens += result["usage"]["total_tokens"]
                total_cost += result["cost_usd"]
                out.write(json.dumps({"ticket_id": ticket["ticket_id"], **result["output"]}) + "\n")
                print(f"{ticket['ticket_id']}: {result['output']}")
        print(f"wrote {len(tickets)} results to {path}; {total_tokens} tokens, ${total_cost:.6f}")
        return str(path)

    write_results(tickets, classify.output)


support_triage()
