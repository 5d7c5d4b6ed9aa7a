"""Documents to ingest, and the chunk records (deterministic ids, content hashes, metadata) made from them.

Ids are derived from the source and the chunk's content, never from time or position in a batch: a rerun
or an Airflow retry upserts the same ids instead of adding duplicates, and an edited chunk gets a new id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from governed_ai.core.retrieval.chunking import ChunkingSettings, chunk_text

# Metadata keys this provider writes on every chunk; callers' metadata may not override them.
SOURCE_KEY = "source"
CONTENT_HASH_KEY = "content_hash"
CHUNK_INDEX_KEY = "chunk_index"
INGESTED_AT_KEY = "ingested_at"  # epoch milliseconds (an int: exact, and Chroma can filter on it with $lt)
RESERVED_KEYS = frozenset(
    {SOURCE_KEY, CONTENT_HASH_KEY, CHUNK_INDEX_KEY, INGESTED_AT_KEY, "dag_id", "run_id"}
)

MetadataValue = str | int | float | bool


@dataclass(frozen=True)
class SourceDocument:
    """A document before chunking: its text, a stable source name (path, URL, ticket id) and metadata."""

    text: str
    source: str
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)

    @classmethod
    def from_obj(cls, obj: object, position: int) -> SourceDocument:
        """A document from a string or a ``{"text": ..., "source": ..., "metadata": {...}}`` dict."""
        if isinstance(obj, str):
            return cls(text=obj, source=f"inline:{content_hash(obj)[:16]}")
        if isinstance(obj, Mapping):
            text = obj.get("text")
            if not isinstance(text, str):
                raise ValueError(
                    f"documents[{position}] needs a 'text' string, got keys {sorted(obj)}; "
                    "pass strings or dicts like {'text': ..., 'source': ..., 'metadata': {...}}"
                )
            source = obj.get("source") or f"inline:{content_hash(text)[:16]}"
            metadata = obj.get("metadata") or {}
            if not isinstance(metadata, Mapping):
                raise ValueError(
                    f"documents[{position}]['metadata'] must be a dict, got {type(metadata).__name__}"
                )
            return cls(text=text, source=str(source), metadata=dict(metadata))
        raise ValueError(
            f"documents[{position}] must be a string or a dict with 'text', got {type(obj).__name__}"
        )


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk as it is written to Chroma."""

    id: str
    text: str
    metadata: dict[str, MetadataValue]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chunk_id(source: str, text: str) -> str:
    """``<16 hex of the source>-<32 hex of the content>``: stable across runs, unique per source+content."""
    return f"{content_hash(source)[:16]}-{content_hash(text)[:32]}"


def _check_metadata(source: str, metadata: Mapping[str, Any]) -> dict[str, MetadataValue]:
    clean: dict[str, MetadataValue] = {}
    for key, value in metadata.items():
        if key in RESERVED_KEYS:
            raise ValueError(
                f"metadata key {key!r} of document {source!r} is reserved (the provider sets it); "
                f"rename it. Reserved keys: {sorted(RESERVED_KEYS)}"
            )
        if not isinstance(value, str | int | float | bool):
            raise ValueError(
                f"metadata {key!r} of document {source!r} must be a string, number or bool "
                f"(Chroma stores scalars only), got {type(value).__name__}"
            )
        clean[str(key)] = value
    return clean


def chunk_records(
    documents: Iterable[SourceDocument],
    settings: ChunkingSettings | None = None,
    *,
    common_metadata: Mapping[str, MetadataValue] | None = None,
    provenance: Mapping[str, MetadataValue] | None = None,
    ingested_at: int,
) -> list[ChunkRecord]:
    """Chunk every document into records; identical chunks of one source collapse into one record.

    ``common_metadata`` and each document's metadata come from the caller and may not use reserved keys;
    ``provenance`` (who wrote it: dag_id, run_id) is the provider's own and may.
    """
    records: dict[str, ChunkRecord] = {}
    for document in documents:
        caller = _check_metadata(document.source, {**(common_metadata or {}), **document.metadata})
        for index, span in enumerate(chunk_text(document.text, settings)):
            record_id = chunk_id(document.source, span.text)
            if record_id in records:
                continue
            records[record_id] = ChunkRecord(
                id=record_id,
                text=span.text,
                metadata={
                    **caller,
                    **(provenance or {}),
                    SOURCE_KEY: document.source,
                    CONTENT_HASH_KEY: content_hash(span.text),
                    CHUNK_INDEX_KEY: index,
                    INGESTED_AT_KEY: ingested_at,
                },
            )
    return list(records.values())


def epoch_ms(moment: datetime) -> int:
    """A moment as the integer epoch milliseconds stored in ``ingested_at``."""
    return round(moment.timestamp() * 1000)
