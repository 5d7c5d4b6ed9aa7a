"""ChromaStore against real Chroma, embedded and as a ``chroma run`` server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta

import pytest

from governed_ai.core.retrieval import SourceDocument, chunk_records
from governed_ai.core.retrieval.chroma_store import (
    EMBEDDING_MODEL_KEY,
    ChromaStore,
    CollectionNotFound,
    EmbeddingModelMismatch,
)

KB = [
    SourceDocument("Refunds are issued within 14 days after the returned item arrives.", "refunds.md"),
    SourceDocument("To reset your password open Settings, then Security, then Reset password.", "account.md"),
    SourceDocument("Shipping to Canada takes five to eight business days.", "shipping.md", {"region": "na"}),
    SourceDocument("The warranty covers manufacturing defects for two years.", "warranty.md"),
]


def _records(docs=KB, at_ms: int | None = None):
    return chunk_records(docs, ingested_at=at_ms if at_ms is not None else int(time.time() * 1000))


def test_upsert_is_idempotent(store, collection_name):
    records = _records()
    store.upsert(collection_name, records)
    store.upsert(collection_name, records)
    store.upsert(collection_name, _records())  # a rerun: same ids, new timestamps
    assert store.count(collection_name) == len(KB)


def test_progress_is_reported_per_batch(store, collection_name):
    seen = []
    store.upsert(collection_name, _records(), batch_size=3, on_batch=seen.append)
    assert [(p.batch, p.batches, p.written) for p in seen] == [(1, 2, 3), (2, 2, 4)]


def test_query_ranks_the_relevant_document_first(store, collection_name):
    store.upsert(collection_name, _records())
    (contexts,) = store.query(collection_name, ["how can I change my password"], n_results=2)
    assert contexts[0].source == "account.md"
    assert len(contexts) == 2
    assert contexts[0].score > contexts[1].score
    assert contexts[0].content_hash == contexts[0].metadata["content_hash"]


def test_several_queries_and_stable_order(store, collection_name):
    store.upsert(collection_name, _records())
    first = store.query(collection_name, ["refund", "warranty defects"], n_results=4)
    again = store.query(collection_name, ["refund", "warranty defects"], n_results=4)
    assert [[c.id for c in r] for r in first] == [[c.id for c in r] for r in again]
    assert first[0][0].source == "refunds.md" and first[1][0].source == "warranty.md"


def test_metadata_filter_and_min_similarity(store, collection_name):
    store.upsert(collection_name, _records())
    (filtered,) = store.query(collection_name, ["password"], n_results=4, where={"region": "na"})
    assert [c.source for c in filtered] == ["shipping.md"]
    (strict,) = store.query(collection_name, ["reset my password"], n_results=4, min_similarity=0.4)
    assert [c.source for c in strict] == ["account.md"]


def test_delete_by_source_ids_and_age(store, collection_name):
    old = int((datetime.now(UTC) - timedelta(days=2)).timestamp() * 1000)
    store.upsert(collection_name, _records(KB[:2], at_ms=old))
    store.upsert(collection_name, _records(KB[2:]))
    assert store.count_newer_than(collection_name, datetime.now(UTC) - timedelta(days=1)) == 1
    assert store.delete(collection_name, where={"ingested_at": {"$lt": old + 1}}) == 2
    assert store.delete(collection_name, where={"source": {"$in": ["shipping.md"]}}) == 1
    (remaining,) = store.existing_ids(collection_name, [r.id for r in _records(KB[3:])])
    assert store.delete(collection_name, ids=[remaining]) == 1
    assert store.count(collection_name) == 0
    with pytest.raises(ValueError, match="refusing to delete"):
        store.delete(collection_name)


class NamedAs:
    """The same vectors under another model name: what a store configured with another model would see."""

    def __init__(self, embedder, model_id: str) -> None:  # type: ignore[no-untyped-def]
        self._embedder = embedder
        self.model_id = model_id

    def embed(self, texts):  # type: ignore[no-untyped-def]
        return self._embedder.embed(texts)


def test_missing_collection_is_not_created_by_reads(store, collection_name):
    with pytest.raises(CollectionNotFound, match="does not exist"):
        store.query(collection_name, ["anything"], n_results=1)
    assert not store.exists(collection_name)


def test_embedding_model_mismatch_is_an_error(store, collection_name):
    store.upsert(collection_name, _records())
    other = ChromaStore(store.client, NamedAs(store.embedder, "some-other-model"))
    with pytest.raises(EmbeddingModelMismatch, match="all-MiniLM-L6-v2-onnx-int8"):
        other.query(collection_name, ["refund"], n_results=1)


def test_collection_from_outside_the_provider_is_refused(store, collection_name):
    store.client.create_collection(collection_name)
    with pytest.raises(EmbeddingModelMismatch, match=EMBEDDING_MODEL_KEY):
        store.count(collection_name)


def test_collection_metadata_records_model_and_cosine_space(store, collection_name):
    store.upsert(collection_name, _records())
    collection = store.client.get_collection(collection_name)
    assert collection.metadata[EMBEDDING_MODEL_KEY] == store.embedding_model
    assert collection.configuration_json["hnsw"]["space"] == "cosine"


@pytest.mark.parametrize("name", ["", "ab"])
def test_short_collection_names_are_refused(store, name):
    with pytest.raises(ValueError, match="at least 3"):
        store.collection(name, create=True)


def test_embedded_data_survives_a_new_process(tmp_path, offline_embedding):
    """Persistence: what one process wrote, a fresh process (fresh client, no cache) reads back."""
    import chromadb
    from chromadb.config import Settings

    path = tmp_path / "chroma"
    client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    store = ChromaStore(client, offline_embedding)
    store.upsert("kb_persist", _records())
    script = textwrap.dedent(
        f"""
        import chromadb
        from chromadb.config import Settings
        from governed_ai.core.retrieval.chroma_store import ChromaStore
        from governed_ai.core.retrieval.embeddings import OfflineMiniLMEmbedding
        ef = OfflineMiniLMEmbedding()
        client = chromadb.PersistentClient(path={str(path)!r}, settings=Settings(anonymized_telemetry=False))
        store = ChromaStore(client, ef)
        (hits,) = store.query("kb_persist", ["refund"], n_results=1)
        print(store.count("kb_persist"), hits[0].source)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(len(KB)), "refunds.md"]
