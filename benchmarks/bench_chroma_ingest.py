"""Chroma ingest and query through the governed operators vs raw ``chromadb`` with the same embeddings.

(a) raw: ``collection.add`` of the same chunks, in the same batches, with the same offline embedding
function (the baseline: what Chroma and the embedding model cost). (b) ``ChromaIngestOperator.execute``
with governance on (policy check, redaction of every document, audit record) into embedded Chroma.
Both start from an empty collection; rounds alternate so warm-up and drift hit both equally. Then the
p50/p95 latency of one query: raw ``collection.query`` vs ``ChromaQueryOperator.execute`` (authorize,
redact the contexts, audit the retrieved ids). Prints throughput, latencies and ratios; goal (b)/(a) >= 0.9.

    .venv/bin/python benchmarks/bench_chroma_ingest.py [--chunks 1200] [--rounds 3] [--queries 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HOME = Path(tempfile.mkdtemp(prefix="bench-chroma-"))
os.environ["AIRFLOW_HOME"] = str(HOME)
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__GOVERNED_AI__STORE_URL"] = f"sqlite:///{HOME / 'governance.db'}"
POLICY = HOME / "policy.yaml"
POLICY.write_text(
    "version: 1\nrules:\n  - name: bench\n    match: {dag_id: bench_dag}\n"
    '    collections: [{name: "kb_*", read: true, write: true}]\n'
)
os.environ["AIRFLOW__GOVERNED_AI__POLICY_PATH"] = str(POLICY)
os.environ["AIRFLOW_CONN_GOVERNED_AI_CHROMA_DEFAULT"] = json.dumps(
    {"conn_type": "governed_ai_chroma", "extra": {"path": str(HOME / "chroma")}}
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from governed_ai.core.retrieval import SourceDocument, chunk_records  # noqa: E402
from governed_ai.hooks.chroma import ChromaHook  # noqa: E402
from governed_ai.operators.chroma import ChromaIngestOperator, ChromaQueryOperator  # noqa: E402


def fake_context(dag_id: str, task_id: str) -> dict[str, Any]:
    """The task identity governance reads (a named fake: the benchmark calls ``execute`` directly)."""
    ti = SimpleNamespace(dag_id=dag_id, task_id=task_id, run_id="manual__bench", try_number=1, map_index=-1)
    return {"ti": ti, "task": SimpleNamespace(owner="bench"), "dag": SimpleNamespace(tags=())}


TOPICS = ["refund", "shipping", "password", "warranty", "invoice", "delivery", "account", "discount"]
BATCH = 256


def make_documents(n: int) -> list[dict[str, str]]:
    # One chunk per document (each well under the chunk size), so both sides embed the same texts.
    return [
        {
            "text": f"Article {i} on {TOPICS[i % len(TOPICS)]}: customers in region {i % 17} ask about "
            f"{TOPICS[(i * 3) % len(TOPICS)]} and {TOPICS[(i * 5) % len(TOPICS)]}; policy number {i * 7919}.",
            "source": f"article-{i}.md",
        }
        for i in range(n)
    ]


def raw_ingest(hook: ChromaHook, name: str, docs: list[dict[str, str]]) -> float:
    records = chunk_records([SourceDocument(d["text"], d["source"]) for d in docs], ingested_at=0)
    collection = hook.get_conn().create_collection(
        name, embedding_function=hook.embedding_function, configuration={"hnsw": {"space": "cosine"}}
    )
    started = time.perf_counter()
    for start in range(0, len(records), BATCH):
        batch = records[start : start + BATCH]
        collection.add(
            ids=[r.id for r in batch],
            documents=[r.text for r in batch],
            metadatas=[r.metadata for r in batch],
        )
    return time.perf_counter() - started


def operator_ingest(name: str, docs: list[dict[str, str]]) -> float:
    op = ChromaIngestOperator(task_id="ingest", collection=name, documents=docs, batch_size=BATCH)
    op.log.disabled = True
    started = time.perf_counter()
    report = op.execute(fake_context("bench_dag", "ingest"))
    elapsed = time.perf_counter() - started
    assert report["chunks"] == len(docs), report
    return elapsed


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    docs = make_documents(args.chunks)
    hook = ChromaHook()
    hook.embedding_function(["warm up the model"])

    raw_times, op_times = [], []
    for r in range(args.rounds):
        raw_times.append(raw_ingest(hook, f"kb_raw_{r}", docs))
        op_times.append(operator_ingest(f"kb_op_{r}", docs))
        print(
            f"round {r + 1}: raw {args.chunks / raw_times[-1]:.0f} chunks/s, "
            f"operator {args.chunks / op_times[-1]:.0f}"
        )
    raw_rate = args.chunks / statistics.median(raw_times)
    op_rate = args.chunks / statistics.median(op_times)
    print(
        f"\ningest of {args.chunks} chunks (median of {args.rounds} rounds, "
        "embedded Chroma, offline embeddings)"
    )
    print(f"  (a) raw chromadb add:          {raw_rate:8.0f} chunks/s")
    print(f"  (b) ChromaIngestOperator:      {op_rate:8.0f} chunks/s  (governed: policy, redaction, audit)")
    print(f"  ratio (b)/(a): {op_rate / raw_rate:.2f}  (goal >= 0.90)")

    questions = [f"how does {TOPICS[i % len(TOPICS)]} work in region {i % 17}" for i in range(args.queries)]
    collection = hook.get_conn().get_collection("kb_raw_0", embedding_function=hook.embedding_function)
    raw_ms, op_ms = [], []
    context = fake_context("bench_dag", "retrieve")
    for question in questions:
        started = time.perf_counter()
        collection.query(query_texts=[question], n_results=4)
        raw_ms.append((time.perf_counter() - started) * 1000)
        op = ChromaQueryOperator(task_id="retrieve", collection="kb_op_0", query=question, n_results=4)
        op.log.disabled = True
        started = time.perf_counter()
        op.execute(context)
        op_ms.append((time.perf_counter() - started) * 1000)
    print(f"\none query, n_results=4, over {args.chunks} chunks ({args.queries} queries)")
    print(
        f"  (a) raw collection.query:      p50 {percentile(raw_ms, 50):6.1f} ms  "
        f"p95 {percentile(raw_ms, 95):6.1f} ms"
    )
    print(
        f"  (b) ChromaQueryOperator:       p50 {percentile(op_ms, 50):6.1f} ms  "
        f"p95 {percentile(op_ms, 95):6.1f} ms"
    )
    print(f"  governance overhead per query (p50): {percentile(op_ms, 50) - percentile(raw_ms, 50):.1f} ms")


if __name__ == "__main__":
    main()
