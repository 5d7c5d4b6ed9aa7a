"""Budget-capped nightly enrichment: write product blurbs until the day's budget is spent, resume tomorrow.

What it shows: a batch job that lives within a budget instead of failing on it. The policy gives this
DAG 2,000 tokens a day (``enrichment-daily``). Each night the job takes the products that have no blurb
yet, and ``LLMBatchOperator`` writes blurbs until the ledger refuses the next block of items. Those
items are reported as "not run: budget exhausted", the run ends successfully, and the next night picks
up where this one stopped. Budget reservations are made before any call, so the day's limit is never
overspent, and everything is in the audit trail and the ledger (``governed-ai budget status``).

Runs offline against the local model; honest note: SmolLM2-135M's blurbs are generic but on topic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import dag, task
from pydantic import BaseModel, Field

from governed_ai.core.paths import provider_home
from governed_ai.core.validation.rows import load_rows
from governed_ai.operators.batch import LLMBatchOperator

PRODUCTS = Path(__file__).parent / "data" / "products.jsonl"


class ProductBlurb(BaseModel):
    blurb: str = Field(max_length=200, description="one sentence that makes a shopper want the product")


def enriched_file() -> Path:
    return provider_home() / "outputs" / "catalog_enrichment" / "enriched.jsonl"


def enriched_skus() -> set[str]:
    path = enriched_file()
    if not path.exists():
        return set()
    return {json.loads(line)["sku"] for line in path.read_text().splitlines() if line.strip()}


@dag(
    dag_id="catalog_enrichment",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one run at a time: runs of this job share state (files, a collection, a budget)
    tags=["governed-ai", "example"],
    default_args={"owner": "merchandising", "retries": 1},
    doc_md=__doc__,
)
def catalog_enrichment() -> None:
    @task
    def pending_products() -> list[dict[str, str]]:
        products = [json.loads(line) for line in PRODUCTS.read_text().splitlines() if line.strip()]
        done = enriched_skus()
        pending = [p for p in products if p["sku"] not in done]
        print(f"{len(products)} products, {len(done)} already enriched, {len(pending)} pending")
        return pending

    enrich = LLMBatchOperator(
        task_id="write_blurbs",
        items=pending_products(),
        key_field="sku",
        system_prompt="You write short, friendly product descriptions for an online shop.",
        prompt_template="Write one sentence about this product.\n{{ item.name }}: {{ item.description }}",
        output_schema=ProductBlurb,
        temperature=0.0,
        max_tokens=64,
        max_repair_attempts=0,
        concurrency=2,
        budget_block_size=4,
        # Items the budget leaves for tomorrow are expected, not a failure of tonight's run.
        on_budget_exhausted="succeed",
        # SmolLM2-135M without repairs sometimes writes a blurb that does not fit the schema: it is retried
        # on the next night's run, it does not fail this one.
        max_failure_rate=0.25,
    )

    @task
    def record_progress(batch: dict[str, Any]) -> dict[str, int]:
        rows = load_rows(batch)  # inline results, or the file the batch wrote them to
        done = [r for r in rows if r["status"] in ("ok", "replayed")]
        path = enriched_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            for row in done:
                out.write(json.dumps({"sku": row["key"], **row["output"]}) + "\n")
        summary = batch["summary"]
        left = len(rows) - len(done)
        print(f"enriched {len(done)} products tonight ({summary['tokens']} tokens); {left} left")
        if summary.get("stopped_by_budget"):
            print(f"stopped by the daily budget, resumes tomorrow: {(summary['stopped'] or '')[:160]}")
        return {"enriched": len(done), "left": left}

    record_progress(enrich.output)


catalog_enrichment()
