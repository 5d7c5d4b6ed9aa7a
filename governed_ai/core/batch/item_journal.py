"""The replay journal of batch items: completed results, written durably before an item counts as done.

It shares the table of :mod:`governed_ai.core.journal` (scope ``"batch"``) but works in bulk: one query
finds every item a previous try already completed, and a writer thread commits completions in groups
(whatever queued up while the previous commit ran). An item's concurrency slot is only freed once its
completion is committed, so after a crash at most ``concurrency`` paid-for items are unknown to the
journal and repeated by the retry; everything else is replayed, not paid for again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import queue
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from governed_ai.core.audit import AuditRecord, AuditStore, canonical_json
from governed_ai.core.journal import JournalState, journal_table, key_digest
from governed_ai.core.sqlstore import (
    dialect_name,
    ensure_tables,
    read_transaction,
    utc_now,
    write_transaction,
)
from governed_ai.core.subject import Subject

SCOPE = "batch"
_LOOKUP_CHUNK = 500


def journal_prefix(
    subject: Subject, *, prompt_version: str, model: str, parameters: Mapping[str, Any]
) -> str:
    """What makes two item results interchangeable: same task instance (not try), prompt, model, settings."""
    settings = hashlib.sha256(canonical_json(dict(parameters)).encode()).hexdigest()[:16]
    return "|".join(
        [
            subject.dag_id,
            subject.run_id,
            subject.task_id,
            str(subject.map_index),
            prompt_version,
            model,
            settings,
        ]
    )


class BatchJournal:
    """Completed batch items of one task instance and configuration (``prefix``)."""

    def __init__(self, engine: Engine, prefix: str) -> None:
        self._engine = engine
        self.prefix = prefix
        ensure_tables(engine, [journal_table])

    def key(self, item_key: str) -> str:
        return f"{self.prefix}|{item_key}"

    def completed(self, item_keys: Sequence[str]) -> dict[str, Any]:
        """Results of the items a previous try completed, by item key."""
        by_digest = {key_digest(self.key(k)): k for k in item_keys}
        found: dict[str, Any] = {}
        digests = list(by_digest)
        with read_transaction(self._engine) as connection:
            for start in range(0, len(digests), _LOOKUP_CHUNK):
                rows = connection.execute(
                    select(journal_table.c.key_sha256, journal_table.c.result).where(
                        journal_table.c.scope == SCOPE,
                        journal_table.c.key_sha256.in_(digests[start : start + _LOOKUP_CHUNK]),
                        journal_table.c.state == JournalState.COMPLETED.value,
                    )
                )
                for digest, result in rows:
                    found[by_digest[digest]] = json.loads(result)
        return found

    def record(self, entries: Iterable[tuple[str, Any]]) -> int:
        """Store completed items in one transaction (an existing entry for the same key is overwritten)."""
        now = utc_now()
        rows = [
            {
                "scope": SCOPE,
                "key_sha256": key_digest(self.key(item_key)),
                "key": self.key(item_key),
                "state": JournalState.COMPLETED.value,
                "claim": "batch",
                "attempts": 1,
                "result": canonical_json(result),
                "error": None,
                "created_at": now,
                "updated_at": now,
            }
            for item_key, result in entries
        ]
        if not rows:
            return 0
        with write_transaction(self._engine) as connection:
            insert = postgresql_insert if dialect_name(connection) == "postgresql" else sqlite_insert
            statement = insert(journal_table)
            statement = statement.on_conflict_do_update(
                index_elements=[journal_table.c.scope, journal_table.c.key_sha256],
                set_={
                    "state": statement.excluded.state,
                    "result": statement.excluded.result,
                    "updated_at": statement.excluded.updated_at,
                },
            )
            connection.execute(statement, rows)
        return len(rows)


@dataclass
class _Pending:
    item_key: str | None  # None: an audit record only (a failed call), nothing to journal
    result: Any
    record: AuditRecord | None
    done: asyncio.Future[None]


def _settle_group(group: list[_Pending], error: BaseException | None) -> None:
    """Runs on the event loop: wakes every item of a committed group (one cross-thread call per group)."""
    for pending in group:
        if pending.done.done():  # the awaiting item was cancelled
            continue
        if error is None:
            pending.done.set_result(None)
        else:
            pending.done.set_exception(error)


class JournalWriter:
    """A thread committing completions in groups; ``await writer.write(...)`` returns once durable.

    With an ``audit`` store, the audit records handed in with completions are appended in the same group,
    before the journal rows: a result that is journaled (and so never paid for again) is always in the
    audit trail too, even when the process is killed right after. A kill between the two commits leaves
    an audited call that is not journaled; the retry repeats it and audits the repeat (both calls
    happened). Nothing of this runs on the event loop.
    """

    def __init__(self, journal: BatchJournal, audit: AuditStore | None = None) -> None:
        self._journal = journal
        self._audit = audit
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="batch-journal", daemon=True)
        self._thread.start()
        self.commits = 0

    async def write(self, item_key: str, result: Any, audit_record: AuditRecord | None = None) -> None:
        """Journal a completed item (and append its audit record); returns once both are committed."""
        await self._put(item_key, result, audit_record)

    async def record_audit(self, audit_record: AuditRecord) -> None:
        """Append an audit record in the next group (for calls that are not journaled, e.g. failures)."""
        await self._put(None, None, audit_record)

    async def _put(self, item_key: str | None, result: Any, record: AuditRecord | None) -> None:
        if record is not None and self._audit is None:
            raise ValueError("this JournalWriter has no audit store; pass audit= to write audit records")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put(_Pending(item_key, result, record, done))
        await done

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while True:  # everything that queued up during the last commit goes into this one
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                group.append(nxt)
            error: Exception | None = None
            try:
                records = [p.record for p in group if p.record is not None]
                if records and self._audit is not None:
                    self._audit.append_many(records)  # first: nothing journaled is missing from the audit
                self._journal.record((p.item_key, p.result) for p in group if p.item_key is not None)
                self.commits += 1
            except Exception as failed:  # the items' coroutines see the failure
                error = failed
            for loop, members in _by_loop(group).items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                    loop.call_soon_threadsafe(_settle_group, members, error)


def _by_loop(group: list[_Pending]) -> dict[asyncio.AbstractEventLoop, list[_Pending]]:
    loops: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
    for pending in group:
        loops.setdefault(pending.done.get_loop(), []).append(pending)
    return loops
