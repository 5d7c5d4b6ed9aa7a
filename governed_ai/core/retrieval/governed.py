"""Governed access to a vector store: authorize, redact, write/read/purge, audit.

Every ingest, query and purge is authorized by the policy's collection grants (``read`` or ``write``),
and audited; a query's audit record lists the ids and content hashes of what was retrieved, so an answer
can be traced back to its sources. Retrieved text is redacted before anyone (a prompt, XCom) sees it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from governed_ai.core.approval import ApprovalGate
from governed_ai.core.audit import AuditRecord
from governed_ai.core.governor import Governor
from governed_ai.core.policy import Decision
from governed_ai.core.retrieval.chroma_store import ChromaStore
from governed_ai.core.retrieval.chunking import ChunkingSettings
from governed_ai.core.retrieval.documents import (
    INGESTED_AT_KEY,
    SOURCE_KEY,
    ChunkRecord,
    MetadataValue,
    SourceDocument,
    chunk_records,
    epoch_ms,
)
from governed_ai.core.retrieval.readiness import collection_readiness
from governed_ai.core.retrieval.results import RetrievedContext, prompt_context
from governed_ai.core.subject import Subject

# Enough to trace any realistic answer while keeping each audit record small.
MAX_AUDITED_CONTEXTS = 100


@dataclass(frozen=True)
class IngestReport:
    collection: str
    documents: int
    chunks: int
    new_chunks: int
    batches: int
    redactions: int
    collection_count: int
    embedding_model: str
    seconds: float
    ingested_at: str  # ISO 8601; chunks not rewritten by this ingest carry an older stamp

    def to_xcom(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IngestProgress:
    """Reported after each written batch, for progress lines in the task log."""

    documents_done: int
    documents_total: int
    chunks_written: int
    batches: int


@dataclass(frozen=True)
class QueryResult:
    query: str
    collection: str
    contexts: list[RetrievedContext]
    redactions: int
    embedding_model: str

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.contexts]

    def to_xcom(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "collection": self.collection,
            "contexts": [c.to_xcom() for c in self.contexts],
            "ids": self.ids,
            "prompt_context": prompt_context(self.contexts),
            "redactions": self.redactions,
            "embedding_model": self.embedding_model,
        }


@dataclass(frozen=True)
class PurgeRequest:
    """What to delete: chunks of these sources, with these ids, or ingested before a moment (any of them)."""

    sources: Sequence[str] = ()
    ids: Sequence[str] = ()
    ingested_before: datetime | None = None

    def where(self) -> dict[str, Any] | None:
        conditions: list[dict[str, Any]] = []
        if self.sources:
            conditions.append({SOURCE_KEY: {"$in": list(self.sources)}})
        if self.ingested_before is not None:
            conditions.append({INGESTED_AT_KEY: {"$lt": epoch_ms(self.ingested_before)}})
        if not conditions:
            return None
        return conditions[0] if len(conditions) == 1 else {"$or": conditions}

    def describe(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources)[:50],
            "ids": len(self.ids),
            "ingested_before": self.ingested_before.isoformat() if self.ingested_before else None,
        }


@dataclass
class GovernedRetrieval:
    """A :class:`ChromaStore` seen through a :class:`Governor`."""

    governor: Governor
    store: ChromaStore
    clock: Callable[[], float] = field(default=time.time)

    def _authorize(self, subject: Subject, collection: str, mode: Literal["read", "write"]) -> Decision:
        decision = self.governor.engine().authorize_collection(subject, collection, mode)
        decision = self.governor.enforce(subject, decision)
        if mode == "write":  # allowed; the policy may still want a human to approve the write first
            gate = ApprovalGate(self.governor, subject)
            if gate.may_need("collection.write"):
                gate.check("collection.write", collection)
        return decision

    def ingest(
        self,
        subject: Subject,
        collection: str,
        documents: Sequence[SourceDocument],
        *,
        chunking: ChunkingSettings | None = None,
        metadata: dict[str, MetadataValue] | None = None,
        batch_size: int = 256,
        on_batch: Callable[[IngestProgress], None] | None = None,
    ) -> IngestReport:
        """Redact (secrets and PII never reach the store, nor its source names and metadata), chunk,
        upsert in batches, and audit. What is redacted is the policy's decision, not the caller's.

        Pipelined: while one batch is embedded and written in a writer thread (onnxruntime and Chroma
        release the GIL), the next documents are redacted and chunked, so governance adds little time.
        """
        self.store.check_name(collection)
        decision = self._authorize(subject, collection, "write")
        started = time.perf_counter()
        ingested_at = int(self.clock() * 1000)
        provenance: dict[str, MetadataValue] = {"dag_id": subject.dag_id, "run_id": subject.run_id}
        redactions = 0
        if metadata:
            metadata, redactions = self.governor.redact_obj(dict(metadata), decision.redaction)
        existed = self.store.exists(collection)
        seen: set[str] = set()
        pending: list[ChunkRecord] = []
        progress = IngestProgress(0, len(documents), 0, 0)
        new_chunks = 0

        def write(batch: list[ChunkRecord], documents_done: int) -> None:
            nonlocal progress, new_chunks
            # A rerun must not look like fresh knowledge (nor be embedded again): count only new chunks.
            new_chunks += self.store.upsert(collection, batch, batch_size=len(batch))
            progress = IngestProgress(
                documents_done, len(documents), progress.chunks_written + len(batch), progress.batches + 1
            )
            if on_batch is not None:
                on_batch(progress)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="chroma-ingest") as writer:
            in_flight: Future[None] | None = None
            for done, document in enumerate(documents, start=1):
                document, found = self._redacted(document, decision)
                redactions += found
                for record in chunk_records(
                    [document],
                    chunking,
                    common_metadata=metadata,
                    provenance=provenance,
                    ingested_at=ingested_at,
                ):
                    if record.id not in seen:
                        seen.add(record.id)
                        pending.append(record)
                while len(pending) >= batch_size or (done == len(documents) and pending):
                    batch, pending = pending[:batch_size], pending[batch_size:]
                    if in_flight is not None:
                        in_flight.result()  # one batch in flight: bounded memory, errors surface early
                    in_flight = writer.submit(write, batch, done)
            if in_flight is not None:
                in_flight.result()
        if not existed and not seen:
            self.store.collection(collection, create=True)  # an empty ingest still creates the collection
        report = IngestReport(
            collection=collection,
            documents=len(documents),
            chunks=len(seen),
            new_chunks=new_chunks,
            batches=progress.batches,
            redactions=redactions,
            collection_count=self.store.count(collection),
            embedding_model=self.store.embedding_model,
            seconds=round(time.perf_counter() - started, 3),
            ingested_at=datetime.fromtimestamp(ingested_at / 1000, UTC).isoformat(),
        )
        self.governor.record(
            AuditRecord.for_subject(
                subject,
                action="collection.ingest",
                resource=collection,
                decision="allow",
                rule=decision.rule,
                latency_ms=report.seconds * 1000,
                extra={
                    "documents": report.documents,
                    "chunks": report.chunks,
                    "new_chunks": report.new_chunks,
                    "redactions": redactions,
                    "collection_count": report.collection_count,
                    "embedding_model": report.embedding_model,
                },
            )
        )
        return report

    def _redacted(self, document: SourceDocument, decision: Decision) -> tuple[SourceDocument, int]:
        """The document with its text, source name and metadata redacted (a file may be named after a
        customer's e-mail address)."""
        text, in_text = self.governor.redact_text(document.text, decision.redaction)
        source, in_source = self.governor.redact_text(document.source, decision.redaction)
        metadata, in_metadata = self.governor.redact_obj(dict(document.metadata), decision.redaction)
        return SourceDocument(text=text, source=source, metadata=metadata), in_text + in_source + in_metadata

    def query(
        self,
        subject: Subject,
        collection: str,
        queries: Sequence[str],
        *,
        n_results: int = 4,
        where: dict[str, Any] | None = None,
        where_document: dict[str, Any] | None = None,
        min_similarity: float | None = None,
    ) -> list[QueryResult]:
        """Authorized, redacted retrieval; the audit trail records what each query returned.

        The query texts are redacted before they are embedded (an embedding endpoint is an egress like any
        other) and the results carry the redacted text.
        """
        decision = self._authorize(subject, collection, "read")
        redacted_queries: list[str] = []
        query_redactions = 0
        for text in queries:
            clean, found = self.governor.redact_text(text, decision.redaction)
            redacted_queries.append(clean)
            query_redactions += found
        queries = redacted_queries
        started = time.perf_counter()
        ranked = self.store.query(
            collection,
            queries,
            n_results=n_results,
            where=where,
            where_document=where_document,
            min_similarity=min_similarity,
        )
        latency_ms = (time.perf_counter() - started) * 1000
        results: list[QueryResult] = []
        for query, contexts in zip(queries, ranked, strict=True):
            redacted: list[RetrievedContext] = []
            found_total = 0
            for context in contexts:
                text, found = self.governor.redact_text(context.text, decision.redaction)
                found_total += found
                redacted.append(
                    context if not found else RetrievedContext(**{**asdict(context), "text": text})
                )
            results.append(QueryResult(query, collection, redacted, found_total, self.store.embedding_model))
        audited = [
            {"q": qi, "id": c.id, "sha256": c.content_hash[:16], "score": c.score}
            for qi, result in enumerate(results)
            for c in result.contexts
        ]
        self.governor.record(
            AuditRecord.for_subject(
                subject,
                action="collection.query",
                resource=collection,
                decision="allow",
                rule=decision.rule,
                latency_ms=latency_ms,
                content="\n".join(queries) if decision.redaction.store_content else None,
                extra={
                    "queries": len(queries),
                    "n_results": n_results,
                    "retrieved": audited[:MAX_AUDITED_CONTEXTS],
                    "truncated": len(audited) > MAX_AUDITED_CONTEXTS,
                    "redactions": sum(r.redactions for r in results) + query_redactions,
                    "embedding_model": self.store.embedding_model,
                },
            )
        )
        return results

    def purge(self, subject: Subject, collection: str, request: PurgeRequest) -> int:
        """Delete contaminated or expired chunks; the purge and its criteria are audited.

        Source names are redacted as ingest stored them, so a purge by a file's real name (one named after
        a customer's e-mail address) finds its chunks, and the audit trail gets the redacted name only.
        """
        decision = self._authorize(subject, collection, "write")
        if request.sources:
            sources, _ = self.governor.redact_obj(list(request.sources), decision.redaction)
            request = replace(request, sources=sources)
        where = request.where()
        deleted = 0
        if request.ids:
            deleted += self.store.delete(collection, ids=request.ids)
        if where is not None:
            deleted += self.store.delete(collection, where=where)
        self.governor.record(
            AuditRecord.for_subject(
                subject,
                action="collection.purge",
                resource=collection,
                decision="allow",
                rule=decision.rule,
                extra={
                    **request.describe(),
                    "deleted": deleted,
                    "collection_count": self.store.count(collection),
                },
            )
        )
        return deleted

    def readiness(
        self, subject: Subject, collection: str, *, min_count: int = 1, newer_than: datetime | None = None
    ) -> tuple[bool, int, str]:
        """Whether the collection exists with enough (or recent enough) chunks: ``(ready, count, why)``.

        Only a denial is audited here: a sensor asks every few minutes, and allowed checks read counts,
        never content.
        """
        self.authorize_read_quietly(subject, collection)
        return collection_readiness(self.store, collection, min_count=min_count, newer_than=newer_than)

    def authorize_read_quietly(self, subject: Subject, collection: str) -> Decision:
        """Authorize a read, auditing (and raising) only a denial."""
        decision = self.governor.engine().authorize_collection(subject, collection, "read")
        if not decision.allowed:
            self.governor.enforce(subject, decision)
        return decision
