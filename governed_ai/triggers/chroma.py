"""Trigger that waits, in the triggerer, until a Chroma collection is ready (deferrable sensor mode)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class ChromaCollectionTrigger(BaseTrigger):
    """Polls a collection's size (and newest ingest) without holding a worker slot.

    The sensor authorizes the read (and audits a denial) before deferring; the trigger only counts
    chunks, it never reads content. Chroma's client is synchronous, so each check runs in a thread and
    the triggerer's event loop stays free for the other triggers.

    :param collection: Collection to watch.
    :param min_count: Ready when the collection holds at least this many chunks.
    :param newer_than: Also require a chunk ingested after this moment (ISO 8601), if given.
    :param chroma_conn_id: Connection of type ``governed_ai_chroma``.
    :param poll_interval: Seconds between checks.
    """

    def __init__(
        self,
        collection: str,
        min_count: int,
        chroma_conn_id: str,
        poll_interval: float = 30.0,
        newer_than: str | None = None,
    ) -> None:
        super().__init__()
        self.collection = collection
        self.min_count = min_count
        self.chroma_conn_id = chroma_conn_id
        self.poll_interval = poll_interval
        self.newer_than = newer_than

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "collection": self.collection,
                "min_count": self.min_count,
                "chroma_conn_id": self.chroma_conn_id,
                "poll_interval": self.poll_interval,
                "newer_than": self.newer_than,
            },
        )

    def _check(self) -> tuple[bool, int, str]:
        from governed_ai.core.retrieval.readiness import collection_readiness
        from governed_ai.hooks.chroma import ChromaHook

        store = ChromaHook(chroma_conn_id=self.chroma_conn_id).store(None)
        newer = datetime.fromisoformat(self.newer_than) if self.newer_than else None
        return collection_readiness(store, self.collection, min_count=self.min_count, newer_than=newer)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                ready, count, reason = await asyncio.to_thread(self._check)
            except Exception as error:  # reported to the sensor, which fails with the reason
                yield TriggerEvent({"status": "error", "collection": self.collection, "message": str(error)})
                return
            if ready:
                yield TriggerEvent(
                    {"status": "success", "collection": self.collection, "count": count, "message": reason}
                )
                return
            self.log.info("%s; checking again in %.0f s", reason, self.poll_interval)
            await asyncio.sleep(self.poll_interval)
