"""Chroma collections with the provider's conventions: cosine space, recorded embedding model, batching.

Airflow-free: it takes any ``chromadb`` client (embedded ``PersistentClient`` or ``HttpClient``); the
Chroma hook builds the client from an Airflow connection and hands it here. Vectors are computed by the
store's :class:`~governed_ai.core.retrieval.embeddings.Embedder` and handed to Chroma explicitly: Chroma
never calls an embedding function itself, so an embedding endpoint is only ever reached through the
governed client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from governed_ai.core.errors import ConfigurationError
from governed_ai.core.extras import requires_extra
from governed_ai.core.retrieval.documents import INGESTED_AT_KEY, ChunkRecord, epoch_ms
from governed_ai.core.retrieval.results import RetrievedContext, rank_contexts

with requires_extra("chroma"):
    from chromadb.errors import NotFoundError

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection

    from governed_ai.core.retrieval.embeddings import Embedder

EMBEDDING_MODEL_KEY = "governed_ai_embedding_model"
MIN_NAME_LENGTH = 3  # Chroma refuses shorter collection names


class CollectionNotFound(ConfigurationError, LookupError):
    """The collection does not exist (queries never create collections)."""


class EmbeddingModelMismatch(ConfigurationError):
    """The collection's vectors come from a different embedding model than the one configured."""


@dataclass(frozen=True)
class UpsertProgress:
    """Reported after each written batch, for progress lines in the task log."""

    written: int
    total: int
    batch: int
    batches: int


class ChromaStore:
    """One Chroma client plus the embedder every collection of this store must use.

    ``embedder`` may be None for a store that only counts, checks and deletes (sensors, purges); such a
    store checks no embedding model either.
    """

    def __init__(self, client: ClientAPI, embedder: Embedder | None) -> None:
        self.client = client
        self.embedder = embedder

    @property
    def embedding_model(self) -> str:
        return self._embedder().model_id

    def _embedder(self) -> Embedder:
        if self.embedder is None:
            raise RuntimeError("this ChromaStore has no embedder; it can count, check and delete only")
        return self.embedder

    # -- collections ---------------------------------------------------------------------------------

    @staticmethod
    def check_name(name: str) -> None:
        if not isinstance(name, str) or len(name) < MIN_NAME_LENGTH:
            raise ValueError(
                f"collection name {name!r} is invalid: Chroma needs at least {MIN_NAME_LENGTH} characters "
                "(letters, digits, '.', '_', '-')"
            )

    def exists(self, name: str) -> bool:
        return name in {c if isinstance(c, str) else c.name for c in self.client.list_collections()}

    def collection(self, name: str, *, create: bool = False) -> Collection:
        """Open (or with ``create`` make) a collection, refusing one built with another embedding model."""
        self.check_name(name)
        try:
            # Opened without our function first: only its metadata is needed to detect a mismatch, and
            # Chroma itself would refuse to open it with a conflicting function with a vaguer message.
            stored = self.client.get_collection(name).metadata or {}
        except (NotFoundError, ValueError) as missing:
            if "does not exist" not in str(missing) and not isinstance(missing, NotFoundError):
                raise
            if not create:
                raise CollectionNotFound(
                    f"Chroma collection {name!r} does not exist; ingest into it first "
                    "(ChromaIngestOperator creates it) or check the name"
                ) from None
            return self.client.get_or_create_collection(
                name,
                metadata={EMBEDDING_MODEL_KEY: self.embedding_model},
                configuration={"hnsw": {"space": "cosine"}},
                embedding_function=None,  # vectors always come from the store's embedder
            )
        if self.embedder is not None:
            self._check_model(name, stored)
        return self.client.get_collection(name, embedding_function=None)

    def _check_model(self, name: str, metadata: Mapping[str, Any]) -> None:
        stored = metadata.get(EMBEDDING_MODEL_KEY)
        if stored == self.embedding_model:
            return
        if stored is None:
            raise EmbeddingModelMismatch(
                f"Chroma collection {name!r} has no {EMBEDDING_MODEL_KEY!r} metadata, so the model its "
                f"vectors came from is unknown; queries with {self.embedding_model!r} could return "
                "garbage. Re-ingest it through ChromaIngestOperator into a new collection."
            )
        raise EmbeddingModelMismatch(
            f"Chroma collection {name!r} was embedded with {stored!r} but this connection embeds with "
            f"{self.embedding_model!r}; vectors of different models are not comparable. Use the "
            "connection the collection was built with, or re-ingest into a new collection."
        )

    def count(self, name: str) -> int:
        return self.collection(name).count()

    def count_newer_than(self, name: str, moment: datetime, limit: int = 1) -> int:
        """How many chunks (up to ``limit``) were ingested after ``moment``."""
        got = self.collection(name).get(
            where={INGESTED_AT_KEY: {"$gt": epoch_ms(moment)}},  # type: ignore[dict-item]
            limit=limit,
            include=[],
        )
        return len(got["ids"])

    # -- writes ------------------------------------------------------------------------------------------

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        return set(self.collection(name).get(ids=list(ids), include=[])["ids"])

    def upsert(
        self,
        name: str,
        records: Sequence[ChunkRecord],
        *,
        batch_size: int = 256,
        on_batch: Callable[[UpsertProgress], None] | None = None,
    ) -> int:
        """Write ``records`` in batches (upsert: the same id twice leaves one chunk); returns how many were
        new (not stored before).

        Chunks already stored (same id: same source and content) only get their metadata refreshed
        (``ingested_at``, run ids): they are not embedded again.
        """
        collection = self.collection(name, create=True)
        batches = max(1, -(-len(records) // batch_size))
        written = 0
        created = 0
        for number, start in enumerate(range(0, len(records), batch_size), start=1):
            batch = records[start : start + batch_size]
            known = set(collection.get(ids=[r.id for r in batch], include=[])["ids"])
            stored = [r for r in batch if r.id in known]
            new = [r for r in batch if r.id not in known]
            if stored:
                collection.update(ids=[r.id for r in stored], metadatas=[r.metadata for r in stored])
            if new:
                collection.upsert(
                    ids=[r.id for r in new],
                    documents=[r.text for r in new],
                    metadatas=[r.metadata for r in new],
                    embeddings=self._embedder().embed([r.text for r in new]),
                )
            created += len(new)
            written += len(batch)
            if on_batch is not None:
                on_batch(UpsertProgress(written=written, total=len(records), batch=number, batches=batches))
        return created

    def delete(
        self, name: str, *, ids: Sequence[str] | None = None, where: dict[str, Any] | None = None
    ) -> int:
        """Delete by ids and/or a metadata filter; returns how many chunks went."""
        if not ids and not where:
            raise ValueError("refusing to delete without ids or a filter (that would empty the collection)")
        collection = self.collection(name)
        matched = collection.get(ids=list(ids) if ids else None, where=where, include=[])["ids"]
        if matched:
            collection.delete(ids=matched)
        return len(matched)

    # -- reads -------------------------------------------------------------------------------------------

    def query(
        self,
        name: str,
        texts: Sequence[str],
        *,
        n_results: int,
        where: dict[str, Any] | None = None,
        where_document: dict[str, Any] | None = None,
        min_similarity: float | None = None,
    ) -> list[list[RetrievedContext]]:
        """The ``n_results`` best chunks per query text, best first, ties broken by id."""
        collection = self.collection(name)
        # One extra candidate per query lets a tie at the cut-off be broken by id instead of by Chroma's
        # internal order, which is not guaranteed to be stable.
        raw = collection.query(
            query_embeddings=self._embedder().embed(list(texts)),
            n_results=n_results + 1,
            where=where,
            where_document=where_document,  # type: ignore[arg-type]
            include=["documents", "metadatas", "distances"],
        )
        documents = raw.get("documents") or [[] for _ in texts]
        metadatas = raw.get("metadatas") or [[] for _ in texts]
        distances = raw.get("distances") or [[] for _ in texts]
        return [
            rank_contexts(
                raw["ids"][i],
                documents[i],
                metadatas[i],
                distances[i],
                min_similarity=min_similarity,
                n_results=n_results,
            )
            for i in range(len(texts))
        ]
