"""Operators for governed retrieval: ingest into, query and purge Chroma collections."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator

from governed_ai.core.errors import InvalidInput
from governed_ai.core.retrieval.chroma_store import ChromaStore
from governed_ai.core.retrieval.chunking import ChunkingSettings
from governed_ai.core.retrieval.documents import SourceDocument
from governed_ai.core.retrieval.embeddings import Embedder, GovernedEmbedder
from governed_ai.core.retrieval.governed import GovernedRetrieval, IngestProgress, PurgeRequest
from governed_ai.hooks.chroma import ChromaHook
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.approval import ApprovalByPolicy
from governed_ai.operators.errors import airflow_errors
from governed_ai.operators.lineage import operator_lineage
from governed_ai.operators.storage import relative_name, storage_path
from governed_ai.plugins.links import AuditRecordsLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

# Files read as plain text; anything else in a directory is skipped (and named in the log).
TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst", ".text"})


class _GovernedChromaOperator(ApprovalByPolicy, BaseOperator):
    """Shared wiring: the Chroma hook, the governance hook and the governed store they make together.

    A write (ingest, purge) to a collection, or an embedding model call, that a policy rule's
    ``require_approval`` names makes the task wait for an approver through Airflow's human-in-the-loop
    (:mod:`governed_ai.operators.approval`); a rejection fails it without retries.
    """

    operator_extra_links = (AuditRecordsLink(),)

    def __init__(
        self,
        *,
        collection: str,
        chroma_conn_id: str = ChromaHook.default_conn_name,
        governance_conn_id: str = GovernanceHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(collection, str) and "{{" not in collection:
            check_collection_name(self.task_id, collection)
        self.collection = collection
        self.chroma_conn_id = chroma_conn_id
        self.governance_conn_id = governance_conn_id

    @cached_property
    def chroma(self) -> ChromaHook:
        return ChromaHook(chroma_conn_id=self.chroma_conn_id)

    @cached_property
    def governance(self) -> GovernanceHook:
        with airflow_errors(self.task_id):  # a governance connection the deployment does not allow
            return GovernanceHook(governance_conn_id=self.governance_conn_id)

    @contextmanager
    def retrieval(self, context: Context, *, embed: bool = True) -> Iterator[GovernedRetrieval]:
        """The governed store for this task; with ``embed`` it computes vectors through the connection's
        embedder (the offline model, or an endpoint through the task's governed client)."""
        with ExitStack() as stack:
            embedder: Embedder | None = None
            if embed:
                settings = self.chroma.settings
                if settings.embedding == "offline":
                    embedder = self.chroma.offline_embedder()
                else:
                    client = stack.enter_context(
                        self.governance.governed_client(context, llm_conn_id=settings.embedding_conn_id)
                    )
                    embedder = GovernedEmbedder(client, str(settings.embedding_model))
                self._embedding_model = embedder.model_id
            yield GovernedRetrieval(self.governance.governor, self.chroma.store(embedder))

    def _namespace(self, ol: Any) -> str:
        s = self.chroma.settings
        return str(ol.collection_namespace(s.host, s.port, s.path))

    def _facet(self, ol: Any, operation: str, **details: Any) -> Any:
        retrieved = details.pop("retrieved_ids", [])
        return ol.GovernedAIRunFacet(
            operation=operation,
            model=getattr(self, "_embedding_model", None),
            retrievedIds=retrieved,
            policyDecision="allow",
            details=details,
        )


def check_collection_name(task_id: str, collection: str) -> None:
    """Parse-time check of a literal collection name (templated names are checked when used)."""
    try:
        ChromaStore.check_name(collection)
    except ValueError as error:
        raise ValueError(f"{task_id}: 'collection': {error}") from None


class ChromaIngestOperator(_GovernedChromaOperator):
    """Chunk documents and upsert them into a Chroma collection, governed and audited.

    Documents come from ``documents`` (strings or ``{"text", "source", "metadata"}`` dicts, e.g. an
    upstream task's XCom) and/or ``paths`` (text and Markdown files, directories of them, local paths or
    ``ObjectStoragePath`` URIs). Each chunk's id is derived from its source and its content, so rerunning
    the task or an Airflow retry upserts the same chunks instead of duplicating them. Secrets and PII are
    redacted before anything is embedded or stored. The policy must grant ``write`` on the collection.

    Chunk metadata: ``source``, ``content_hash``, ``chunk_index``, ``ingested_at`` (epoch milliseconds),
    ``dag_id``, ``run_id``, plus ``metadata`` and each document's own metadata.

    The XCom value: ``collection``, ``documents``, ``chunks``, ``new_chunks`` (not already stored),
    ``batches``, ``redactions``, ``collection_count``, ``embedding_model``, ``seconds``, ``ingested_at``
    (ISO 8601 stamp of this ingest: chunks with an older stamp were not in this ingest; see
    ``ChromaPurgeOperator(ingested_before=...)``).

    :param collection: Collection name (3+ characters); created on first ingest. Templated.
    :param documents: Strings or dicts with ``text`` and optional ``source``/``metadata``. Templated.
    :param paths: Files or directories (``.txt``, ``.md``, ``.markdown``, ``.rst``) to read, as local
        paths or URIs such as ``s3://bucket/kb/``. A file's source name is the path as given; inside a
        directory, the path relative to it. Templated.
    :param metadata: Metadata added to every chunk (string, number or bool values). Templated.
    :param chunk_size: Maximum characters per chunk (default 800, about 200 tokens).
    :param chunk_overlap: Characters repeated between neighbouring chunks (default 100).
    :param batch_size: Chunks embedded and written per batch; progress is logged after each.
    :param chroma_conn_id: Connection of type ``governed_ai_chroma``; absent means embedded Chroma
        under ``$AIRFLOW_HOME/governed_ai/chroma`` with offline embeddings.
    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional; default
        ``governed_ai_governance_default``). Only connections the deployment lists in ``[governed_ai]
        allowed_governance_conn_ids`` may be named; any other fails the task before any call.
    """

    template_fields: Sequence[str] = ("collection", "documents", "paths", "metadata")
    template_fields_renderers = {"documents": "json", "metadata": "json"}
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        collection: str,
        documents: list[Any] | None = None,
        paths: list[str] | str | None = None,
        metadata: dict[str, Any] | None = None,
        chunk_size: int = 800,
        chunk_overlap: int = 100,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(collection=collection, **kwargs)
        if documents is None and paths is None:
            raise ValueError(f"{self.task_id}: give 'documents' (a list) and/or 'paths' (files/directories).")
        if not 1 <= batch_size <= 5000:
            raise ValueError(f"{self.task_id}: 'batch_size' must be 1..5000, got {batch_size}.")
        try:
            self.chunking = ChunkingSettings(chunk_size=chunk_size, chunk_overlap=chunk_overlap)
        except ValueError as error:
            raise ValueError(f"{self.task_id}: chunking settings: {error}") from None
        self.documents = documents
        self.paths = paths
        self.metadata = metadata
        self.batch_size = batch_size

    def source_documents(self) -> list[SourceDocument]:
        """The rendered ``documents`` and the files under ``paths``, checked."""
        docs: list[SourceDocument] = []
        raw = self.documents
        if raw is not None:
            if isinstance(raw, str | dict):
                raw = [raw]
            if not isinstance(raw, list | tuple):
                raise TypeError(
                    f"{self.task_id}: 'documents' must be a list of strings or dicts, "
                    f"got {type(raw).__name__}"
                )
            try:
                docs.extend(SourceDocument.from_obj(item, i) for i, item in enumerate(raw))
            except ValueError as error:
                raise ValueError(f"{self.task_id}: {error}") from None
        paths = [self.paths] if isinstance(self.paths, str) else list(self.paths or [])
        for given in paths:
            docs.extend(self._read_path(str(given)))
        return docs

    def _read_path(self, given: str) -> list[SourceDocument]:
        root = storage_path(given)
        if not root.exists():
            raise FileNotFoundError(f"{self.task_id}: 'paths' entry {given!r} does not exist.")
        if root.is_file():
            return [SourceDocument(text=root.read_text(encoding="utf-8"), source=given)]
        found = []
        skipped: dict[str, int] = {}
        for file in sorted(root.rglob("*"), key=str):
            if not file.is_file():
                continue
            if file.suffix.lower() not in TEXT_SUFFIXES:
                skipped[file.suffix.lower() or "(none)"] = skipped.get(file.suffix.lower() or "(none)", 0) + 1
                continue
            found.append(
                SourceDocument(text=file.read_text(encoding="utf-8"), source=relative_name(file, root))
            )
        if skipped:
            # Counts by suffix, not names: a file may be named after a customer (the names are redacted
            # before they are stored, but a log line is not).
            self.log.info("Skipped files that are not text or Markdown, by suffix: %s", skipped)
        if not found:
            raise FileNotFoundError(
                f"{self.task_id}: no text or Markdown files under {given!r} "
                f"(looked for {sorted(TEXT_SUFFIXES)})."
            )
        return found

    def _log_progress(self, progress: IngestProgress) -> None:
        self.log.info(
            "Ingest into %s: %d/%d documents processed, %d chunks written in %d batch(es)",
            self.collection,
            progress.documents_done,
            progress.documents_total,
            progress.chunks_written,
            progress.batches,
        )

    def execute(self, context: Context) -> dict[str, Any]:
        return self.with_approval(context, lambda: self._ingest(context))

    def _ingest(self, context: Context) -> dict[str, Any]:
        documents = self.source_documents()
        if not documents:
            raise ValueError(f"{self.task_id}: nothing to ingest ('documents' rendered to an empty list).")
        subject = self.governance.subject_from_context(context)
        self.log.info("Ingesting %d document(s) into Chroma collection %s", len(documents), self.collection)
        with airflow_errors(self.task_id), self.retrieval(context) as retrieval:
            report = retrieval.ingest(
                subject,
                self.collection,
                documents,
                chunking=self.chunking,
                metadata=dict(self.metadata or {}),
                batch_size=self.batch_size,
                on_batch=self._log_progress,
            )
        self.log.info(
            "Ingested %d chunks (%d new) from %d document(s) in %.2f s; collection holds %d; redactions=%d",
            report.chunks,
            report.new_chunks,
            report.documents,
            report.seconds,
            report.collection_count,
            report.redactions,
        )
        self._report = report
        return report.to_xcom()

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        report = getattr(self, "_report", None)
        paths = [self.paths] if isinstance(self.paths, str) else list(self.paths or [])

        def build(ol: Any, _: Any) -> tuple[list[Any], list[Any], Any]:
            inputs = [ol.file_input(str(p)) for p in paths]
            outputs = [ol.collection_output(self._namespace(ol), self.collection)]
            details = {} if report is None else {"chunks": report.chunks, "new_chunks": report.new_chunks}
            return inputs, outputs, self._facet(ol, "ingest", **details)

        return operator_lineage(build)


class ChromaQueryOperator(_GovernedChromaOperator):
    """Retrieve the chunks most similar to a query, governed, redacted and traceable.

    The policy must grant ``read`` on the collection. Retrieved text is redacted; the audit trail records
    the ids, content hashes and scores of what was returned, so an answer can be traced to its sources.

    The XCom value, for a single ``query`` string: ``query``, ``collection``, ``contexts`` (best first,
    each ``id``, ``text``, ``score`` (cosine similarity), ``source``, ``content_hash``, ``metadata``),
    ``ids``, ``prompt_context`` (the contexts as untrusted-data blocks labelled with their ids, ready to
    paste into a prompt), ``redactions``, ``embedding_model``. For a list of queries, a list of those.

    :param collection: Collection to query. Templated.
    :param query: A query text, or a list of them. Templated.
    :param n_results: How many chunks per query (1..100). Ties in score are ordered by id.
    :param where: Chroma metadata filter, e.g. ``{"source": "refunds.md"}``. Templated.
    :param where_document: Chroma document filter, e.g. ``{"$contains": "refund"}``. Templated.
    :param min_similarity: Drop chunks whose cosine similarity is below this (-1..1).
    :param chroma_conn_id: Connection of type ``governed_ai_chroma`` (optional).
    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional; default
        ``governed_ai_governance_default``). Only connections the deployment lists in ``[governed_ai]
        allowed_governance_conn_ids`` may be named; any other fails the task before any call.
    """

    template_fields: Sequence[str] = ("collection", "query", "where", "where_document")
    template_fields_renderers = {"where": "json", "where_document": "json"}
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        collection: str,
        query: str | list[str],
        n_results: int = 4,
        where: dict[str, Any] | None = None,
        where_document: dict[str, Any] | None = None,
        min_similarity: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(collection=collection, **kwargs)
        if not 1 <= n_results <= 100:
            raise ValueError(f"{self.task_id}: 'n_results' must be 1..100, got {n_results}.")
        if min_similarity is not None and not -1.0 <= min_similarity <= 1.0:
            raise ValueError(f"{self.task_id}: 'min_similarity' is a cosine similarity in -1..1.")
        self.query = query
        self.n_results = n_results
        self.where = where
        self.where_document = where_document
        self.min_similarity = min_similarity

    def rendered_queries(self) -> tuple[list[str], bool]:
        if isinstance(self.query, str):
            queries, single = [self.query], True
        elif isinstance(self.query, list | tuple) and all(isinstance(q, str) for q in self.query):
            queries, single = list(self.query), False
        else:
            raise InvalidInput(f"{self.task_id}: 'query' must be a string or a list of strings.")
        if not queries or any(not q.strip() for q in queries):
            raise InvalidInput(f"{self.task_id}: 'query' rendered to an empty text; nothing to search for.")
        return queries, single

    def execute(self, context: Context) -> dict[str, Any] | list[dict[str, Any]]:
        return self.with_approval(context, lambda: self._query(context))

    def _query(self, context: Context) -> dict[str, Any] | list[dict[str, Any]]:
        with airflow_errors(self.task_id):
            queries, single = self.rendered_queries()
            with self.retrieval(context) as retrieval:
                results = retrieval.query(
                    self.governance.subject_from_context(context),
                    self.collection,
                    queries,
                    n_results=self.n_results,
                    where=self.where or None,
                    where_document=self.where_document or None,
                    min_similarity=self.min_similarity,
                )
        for number, result in enumerate(results, start=1):
            # The query text itself stays out of the log: it is data, and it may hold what was redacted.
            self.log.info(
                "Query %d (%d chars): %d context(s) %s",
                number,
                len(result.query),
                len(result.contexts),
                [(c.id[:12], c.score) for c in result.contexts],
            )
        self._retrieved = [c.id for r in results for c in r.contexts]
        payload = [r.to_xcom() for r in results]
        return payload[0] if single else payload

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        retrieved = list(getattr(self, "_retrieved", []))

        def build(ol: Any, _: Any) -> tuple[list[Any], list[Any], Any]:
            inputs = [ol.collection_input(self._namespace(ol), self.collection)]
            return inputs, [], self._facet(ol, "retrieval", retrieved_ids=retrieved)

        return operator_lineage(build)


class ChromaPurgeOperator(_GovernedChromaOperator):
    """Delete chunks from a collection: by source, by id, or by age. For contaminated or expired memory.

    The policy must grant ``write`` on the collection; each purge is audited with its criteria and the
    number of chunks deleted. Criteria combine with OR (a chunk matching any of them goes). With no
    criterion the task fails instead of emptying the collection.

    :param collection: Collection to purge. Templated.
    :param sources: Delete every chunk whose ``source`` is in this list. Templated. Names are redacted
        as ingest stored them, so a file named after a customer is purged by its real name (and names that
        redact to the same text, such as two e-mail addresses, are purged together).
    :param ids: Delete these chunk ids. Templated.
    :param ingested_before: Delete chunks ingested before this moment (datetime or ISO 8601 string,
        e.g. ``"{{ data_interval_start }}"``). Templated.
    :param max_age: Delete chunks older than this (a ``timedelta``) at the time the task runs.
    :param chroma_conn_id: Connection of type ``governed_ai_chroma`` (optional).
    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional; default
        ``governed_ai_governance_default``). Only connections the deployment lists in ``[governed_ai]
        allowed_governance_conn_ids`` may be named; any other fails the task before any call.
    """

    template_fields: Sequence[str] = ("collection", "sources", "ids", "ingested_before")
    ui_color = "#fce8e6"

    def __init__(
        self,
        *,
        collection: str,
        sources: list[str] | None = None,
        ids: list[str] | None = None,
        ingested_before: datetime | str | None = None,
        max_age: timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(collection=collection, **kwargs)
        if not sources and not ids and ingested_before is None and max_age is None:
            raise ValueError(
                f"{self.task_id}: give at least one of 'sources', 'ids', 'ingested_before', 'max_age' "
                "(refusing to empty the whole collection)."
            )
        if max_age is not None and max_age <= timedelta(0):
            raise ValueError(f"{self.task_id}: 'max_age' must be positive, got {max_age}.")
        self.sources = sources
        self.ids = ids
        self.ingested_before = ingested_before
        self.max_age = max_age

    def purge_request(self, now: datetime | None = None) -> PurgeRequest:
        cutoffs = []
        if self.ingested_before not in (None, ""):
            cutoffs.append(as_datetime(self.task_id, self.ingested_before))
        if self.max_age is not None:
            cutoffs.append((now or datetime.now(UTC)) - self.max_age)
        return PurgeRequest(
            sources=[str(s) for s in self.sources or ()],
            ids=[str(i) for i in self.ids or ()],
            ingested_before=max(cutoffs) if cutoffs else None,
        )

    def execute(self, context: Context) -> dict[str, Any]:
        return self.with_approval(context, lambda: self._purge(context))

    def _purge(self, context: Context) -> dict[str, Any]:
        with airflow_errors(self.task_id), self.retrieval(context, embed=False) as retrieval:
            request = self.purge_request()
            deleted = retrieval.purge(self.governance.subject_from_context(context), self.collection, request)
            remaining = retrieval.store.count(self.collection)
        self.log.info(
            "Purged %d chunk(s) from %s (by %d source(s), %d id(s), ingested before %s); %d remain",
            deleted,
            self.collection,
            len(request.sources),  # names stay out of the log: a source may be named after a customer
            len(request.ids),
            request.ingested_before.isoformat() if request.ingested_before else "-",
            remaining,
        )
        self._deleted = deleted
        return {"collection": self.collection, "deleted": deleted, "collection_count": remaining}

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        deleted = getattr(self, "_deleted", None)

        def build(ol: Any, _: Any) -> tuple[list[Any], list[Any], Any]:
            outputs = [ol.collection_output(self._namespace(ol), self.collection)]
            return [], outputs, self._facet(ol, "purge", deleted=deleted)

        return operator_lineage(build)


def as_datetime(task_id: str, value: datetime | str) -> datetime:
    """A rendered datetime or ISO 8601 string as an aware datetime (naive means UTC)."""
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            raise ValueError(
                f"{task_id}: 'ingested_before' must be a datetime or an ISO 8601 string, got {value!r}."
            ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
