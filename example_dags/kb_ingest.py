"""Nightly knowledge-base ingest: keep the support knowledge base in Chroma in step with its files.

What it shows: governed writes to a vector store. The policy lets only this DAG (owner ``ai-platform``)
write to ``kb_*`` collections. Every Markdown file under ``data/knowledge_base/`` is chunked, redacted
and upserted with ids derived from source and content, so the nightly rerun changes nothing unless a
file changed. Chunks that this run did not rewrite (from files that were edited or deleted) are purged
afterwards, and the purge is audited: stale or contaminated memory does not linger.

The ingest declares the ``chroma://kb_support`` asset as its outlet; ``kb_answering`` is scheduled on it.
Chroma runs embedded under ``$AIRFLOW_HOME/governed_ai/chroma`` with offline embeddings unless the
``governed_ai_chroma_default`` connection points at a Chroma server.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import Asset, dag

from governed_ai.operators.chroma import ChromaIngestOperator, ChromaPurgeOperator

KNOWLEDGE_BASE = Path(__file__).parent / "data" / "knowledge_base"
COLLECTION = "kb_support"
KB_ASSET = Asset(f"chroma://{COLLECTION}")


@dag(
    dag_id="kb_ingest",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one run at a time: runs of this job share state (files, a collection, a budget)
    tags=["governed-ai", "rag", "example"],
    default_args={"owner": "ai-platform", "retries": 1},
    doc_md=__doc__,
)
def kb_ingest() -> None:
    ingest = ChromaIngestOperator(
        task_id="ingest",
        collection=COLLECTION,
        paths=[str(KNOWLEDGE_BASE)],
        metadata={"kb": "support"},
        chunk_size=600,
        chunk_overlap=80,
    )
    purge_stale = ChromaPurgeOperator(
        task_id="purge_stale",
        collection=COLLECTION,
        # Every chunk still in the files was re-stamped by this ingest; anything older is stale.
        ingested_before="{{ ti.xcom_pull(task_ids='ingest')['ingested_at'] }}",
        outlets=[KB_ASSET],
    )
    ingest >> purge_stale


kb_ingest()
