"""Chroma ingest/query/purge operators, the collection sensor and its trigger, on real embedded Chroma."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from governed_ai.core.audit import AuditStore
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.operators.chroma import ChromaIngestOperator, ChromaPurgeOperator, ChromaQueryOperator
from governed_ai.sensors.chroma import ChromaCollectionSensor
from governed_ai.triggers.chroma import ChromaCollectionTrigger
from tests.conftest import fake_context

POLICY = """
version: 1
rules:
  - name: writer
    match: {dag_id: "ingest_dag"}
    collections: [{name: "kb_*", read: true, write: true}]
  - name: reader
    match: {dag_id: "rag_dag"}
    collections: [{name: "kb_*", read: true}]
"""
COLLECTION = "kb_ops"
WRITE = fake_context("ingest_dag", "ingest")
READ = fake_context("rag_dag", "retrieve")


@pytest.fixture
def chroma_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, governance_policy) -> Path:
    governance_policy(POLICY)
    path = tmp_path / "chroma"
    monkeypatch.setenv(
        "AIRFLOW_CONN_GOVERNED_AI_CHROMA_DEFAULT",
        json.dumps({"conn_type": "governed_ai_chroma", "extra": {"path": str(path)}}),
    )
    return path


@pytest.fixture
def kb_dir(tmp_path: Path) -> Path:
    kb = tmp_path / "kb"
    (kb / "sub").mkdir(parents=True)
    (kb / "refunds.md").write_text(
        "# Refunds\n\nRefunds are issued within 14 days after the return arrives.\n"
    )
    (kb / "sub" / "account.txt").write_text("To reset your password open Settings, then Security.\n")
    (kb / "logo.png").write_bytes(b"\x89PNG not text")
    return kb


def audit_records(action: str) -> list:
    import os

    store = AuditStore(create_store_engine(os.environ["AIRFLOW__GOVERNED_AI__STORE_URL"]))
    return sorted(store.query(action=action), key=lambda r: r.seq)


def ingest(**kwargs) -> dict:
    op = ChromaIngestOperator(task_id="ingest", collection=COLLECTION, **kwargs)
    return op.execute(WRITE)


def test_ingest_files_and_documents_then_rerun_changes_nothing(chroma_env, kb_dir, capsys):
    docs = [{"text": "Shipping to Canada takes five days.", "source": "shipping", "metadata": {"lang": "en"}}]
    first = ingest(paths=[str(kb_dir)], documents=docs, metadata={"kb": "support"}, batch_size=1)
    assert (first["documents"], first["chunks"], first["new_chunks"], first["collection_count"]) == (
        3,
        3,
        3,
        3,
    )
    log = capsys.readouterr().out  # Airflow's task logger writes to stdout here
    assert (
        "3/3 documents processed, 3 chunks written in 3 batch(es)" in log and "by suffix: {'.png': 1}" in log
    )
    again = ingest(paths=[str(kb_dir)], documents=docs, metadata={"kb": "support"})
    assert (again["new_chunks"], again["collection_count"]) == (0, 3)
    assert [r.extra["chunks"] for r in audit_records("collection.ingest")] == [3, 3]


def test_query_returns_ranked_traceable_contexts(chroma_env, kb_dir):
    ingest(paths=[str(kb_dir)])
    op = ChromaQueryOperator(
        task_id="retrieve", collection=COLLECTION, query="how do I reset my password", n_results=2
    )
    result = op.execute(READ)
    assert result["contexts"][0]["source"] == "sub/account.txt"
    assert result["ids"] == [c["id"] for c in result["contexts"]]
    assert result["ids"][0] in result["prompt_context"]
    (record,) = audit_records("collection.query")
    assert [r["id"] for r in record.extra["retrieved"]] == result["ids"]


def test_query_with_a_list_returns_one_result_per_query(chroma_env, kb_dir):
    ingest(paths=[str(kb_dir)])
    op = ChromaQueryOperator(
        task_id="retrieve", collection=COLLECTION, query=["refund", "password"], n_results=1
    )
    results = op.execute(READ)
    assert [r["contexts"][0]["source"] for r in results] == ["refunds.md", "sub/account.txt"]


def test_reader_cannot_ingest_and_the_task_fails_without_retry(chroma_env, kb_dir):
    op = ChromaIngestOperator(task_id="ingest", collection=COLLECTION, paths=[str(kb_dir)])
    with pytest.raises(AirflowFailException, match="denied by governance"):
        op.execute(READ)
    assert audit_records("collection.ingest") == []


def test_query_on_a_missing_collection_fails_clearly(chroma_env):
    op = ChromaQueryOperator(task_id="retrieve", collection="kb_missing", query="x")
    with pytest.raises(AirflowFailException, match="does not exist"):
        op.execute(READ)


def test_purge_by_source_and_by_the_last_ingest_stamp(chroma_env, kb_dir):
    report = ingest(paths=[str(kb_dir)])
    purge = ChromaPurgeOperator(task_id="purge", collection=COLLECTION, sources=["refunds.md"])
    assert purge.execute(WRITE) == {"collection": COLLECTION, "deleted": 1, "collection_count": 1}
    # Chunks re-stamped by the latest ingest survive a purge of everything older than it.
    (kb_dir / "refunds.md").write_text("Refunds now take 10 days.\n")
    latest = ingest(paths=[str(kb_dir)])
    assert latest["ingested_at"] > report["ingested_at"]
    stale = ChromaPurgeOperator(task_id="purge", collection=COLLECTION, ingested_before=latest["ingested_at"])
    assert stale.execute(WRITE)["deleted"] == 0
    assert [r.extra["deleted"] for r in audit_records("collection.purge")] == [1, 0]


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ChromaIngestOperator(task_id="t", collection="kb"), "at least 3"),
        (lambda: ChromaIngestOperator(task_id="t", collection="kb_x"), "give 'documents'"),
        (lambda: ChromaIngestOperator(task_id="t", collection="kb_x", documents=[], chunk_size=10), "chunk"),
        (lambda: ChromaQueryOperator(task_id="t", collection="kb_x", query="q", n_results=0), "n_results"),
        (lambda: ChromaPurgeOperator(task_id="t", collection="kb_x"), "refusing to empty"),
        (lambda: ChromaCollectionSensor(task_id="t", collection="kb_x", min_count=-1), "min_count"),
    ],
)
def test_parse_time_errors_name_the_task_and_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_rendered_input_is_explained(chroma_env, tmp_path):
    with pytest.raises(ValueError, match=r"documents\[1\] needs a 'text' string"):
        ingest(documents=["ok", {"body": "x"}])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest(paths=[str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="ISO 8601"):
        ChromaPurgeOperator(task_id="p", collection=COLLECTION, ingested_before="yesterday").purge_request()


def test_sensor_pokes_until_the_collection_is_big_enough(chroma_env, kb_dir):
    sensor = ChromaCollectionSensor(task_id="wait", collection=COLLECTION, min_count=2)
    assert sensor.mode == "reschedule"
    assert sensor.poke(READ) is False
    ingest(paths=[str(kb_dir)])
    assert sensor.poke(READ) is True
    fresh = ChromaCollectionSensor(
        task_id="wait", collection=COLLECTION, newer_than=(datetime.now(UTC) + timedelta(hours=1)).isoformat()
    )
    assert fresh.poke(READ) is False


def test_sensor_denied_read_fails_at_once(chroma_env):
    sensor = ChromaCollectionSensor(task_id="wait", collection=COLLECTION)
    with pytest.raises(AirflowFailException, match="denied"):
        sensor.poke(fake_context("other_dag", "wait"))


def test_deferrable_sensor_defers_and_the_trigger_fires_when_ready(chroma_env, kb_dir):
    sensor = ChromaCollectionSensor(
        task_id="wait", collection=COLLECTION, min_count=1, deferrable=True, poke_interval=0.05, timeout=60
    )
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(READ)
    trigger = deferred.value.trigger
    assert isinstance(trigger, ChromaCollectionTrigger)
    classpath, kwargs = trigger.serialize()
    rebuilt = ChromaCollectionTrigger(**kwargs)
    assert classpath == "governed_ai.triggers.chroma.ChromaCollectionTrigger"

    async def wait_then_ingest() -> dict:
        runner = rebuilt.run().__anext__()
        task = asyncio.ensure_future(runner)
        await asyncio.sleep(0.3)
        assert not task.done(), "the trigger fired before the collection existed"
        await asyncio.to_thread(ingest, paths=[str(kb_dir)])
        event = await asyncio.wait_for(task, timeout=30)
        return event.payload

    payload = asyncio.run(wait_then_ingest())
    assert payload["status"] == "success" and payload["count"] == 2
    sensor.execute_complete(READ, payload)
    with pytest.raises(AirflowFailException):
        sensor.execute_complete(READ, {"status": "error", "message": "boom"})
