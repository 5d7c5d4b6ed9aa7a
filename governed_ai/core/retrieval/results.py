"""Query results as ranked, traceable contexts: ids, similarity scores, content hashes, metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from governed_ai.core.retrieval.documents import CONTENT_HASH_KEY, SOURCE_KEY, content_hash
from governed_ai.core.untrusted import UntrustedText, mark_all_untrusted


@dataclass(frozen=True)
class RetrievedContext:
    """One retrieved chunk. ``score`` is cosine similarity in [-1, 1] (1 = same direction)."""

    id: str
    text: str
    score: float
    source: str | None
    content_hash: str
    metadata: dict[str, Any]

    def to_xcom(self) -> dict[str, Any]:
        return asdict(self)


def similarity_from_distance(distance: float) -> float:
    """Chroma's cosine *distance* is ``1 - cosine similarity``."""
    return 1.0 - float(distance)


def rank_contexts(
    ids: Sequence[str],
    documents: Sequence[str | None],
    metadatas: Sequence[Mapping[str, Any] | None],
    distances: Sequence[float],
    *,
    min_similarity: float | None = None,
    n_results: int | None = None,
) -> list[RetrievedContext]:
    """Contexts best first; equal scores are ordered by id so the same query always gives the same list."""
    contexts = []
    for chunk_id, text, metadata, distance in zip(ids, documents, metadatas, distances, strict=True):
        score = round(similarity_from_distance(distance), 6)  # rounding makes float-noise ties real ties
        if min_similarity is not None and score < min_similarity:
            continue
        meta = dict(metadata or {})
        body = text or ""
        contexts.append(
            RetrievedContext(
                id=chunk_id,
                text=body,
                score=score,
                source=str(meta[SOURCE_KEY]) if SOURCE_KEY in meta else None,
                content_hash=str(meta.get(CONTENT_HASH_KEY) or content_hash(body)),
                metadata=meta,
            )
        )
    contexts.sort(key=lambda c: (-c.score, c.id))
    return contexts[:n_results] if n_results is not None else contexts


def prompt_context(contexts: Sequence[RetrievedContext]) -> str:
    """The contexts as untrusted-data blocks for a prompt, each labelled with its id for citation."""
    if not contexts:
        return "(no relevant documents were found)"
    return mark_all_untrusted(UntrustedText(c.text, source=f"document {c.id}") for c in contexts)
