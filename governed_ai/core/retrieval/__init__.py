"""Retrieval core (Airflow-free): embeddings, chunking, deterministic chunk ids, ranked contexts."""

from governed_ai.core.retrieval.chunking import ChunkingSettings, TextSpan, chunk_text
from governed_ai.core.retrieval.documents import (
    ChunkRecord,
    SourceDocument,
    chunk_id,
    chunk_records,
    content_hash,
)
from governed_ai.core.retrieval.results import RetrievedContext, prompt_context, rank_contexts

__all__ = [
    "ChunkRecord",
    "ChunkingSettings",
    "RetrievedContext",
    "SourceDocument",
    "TextSpan",
    "chunk_id",
    "chunk_records",
    "chunk_text",
    "content_hash",
    "prompt_context",
    "rank_contexts",
]
