"""Is a collection ready for readers: present, big enough, fresh enough? Shared by sensor and trigger."""

from __future__ import annotations

from datetime import datetime

from governed_ai.core.retrieval.chroma_store import ChromaStore


def collection_readiness(
    store: ChromaStore, collection: str, *, min_count: int = 1, newer_than: datetime | None = None
) -> tuple[bool, int, str]:
    """``(ready, chunk count, why)``; counts only, no content is read."""
    if not store.exists(collection):
        return False, 0, f"collection {collection!r} does not exist yet"
    count = store.count(collection)
    if count < min_count:
        return False, count, f"collection {collection!r} holds {count} chunk(s), waiting for {min_count}"
    if newer_than is not None and not store.count_newer_than(collection, newer_than):
        return False, count, f"collection {collection!r} has no chunk ingested after {newer_than.isoformat()}"
    return True, count, f"collection {collection!r} is ready with {count} chunk(s)"
