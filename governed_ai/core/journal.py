"""A replay journal: do a side-effecting piece of work at most once per idempotency key, across retries.

Before the work, :meth:`ReplayJournal.begin` claims the key. The answer is one of:

- ``claimed``: nobody did it yet (or an earlier attempt failed cleanly): do it, then :meth:`~ReplayJournal.
  complete` with its JSON result, or :meth:`~ReplayJournal.fail` if it raised;
- ``completed``: it was done before: use the stored result instead of doing it again (a replay);
- ``in_doubt``: an earlier attempt claimed it and never reported back (the process died mid-work, or it is
  still running elsewhere). Whether the effect happened is unknown; the caller decides (work that is safe to
  repeat passes ``reclaim_in_doubt=True``).

Entries live in the governance SQL store next to the audit trail, keyed by ``(scope, sha256(key))``: the
primary key makes two concurrent claims of one key impossible on SQLite and PostgreSQL alike. ``scope``
separates users (``"tool"`` for tool calls, ``"batch"`` for batch items). There is no automatic clean-up:
entries are small, and deleting them would make old runs' retries repeat their effects.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import Column, Engine, Integer, RowMapping, String, Table, Text, select, update
from sqlalchemy.engine import Connection

from governed_ai.core.audit import canonical_json
from governed_ai.core.sqlstore import (
    UtcDateTime,
    ensure_tables,
    governance_metadata,
    insert_if_missing,
    read_transaction,
    utc_now,
    write_transaction,
)

# Results are replayed into prompts and XComs; a journal is not a blob store.
MAX_RESULT_BYTES = 1_000_000

journal_table = Table(
    "governed_ai_journal",
    governance_metadata,
    Column("scope", String(64), primary_key=True),
    Column("key_sha256", String(64), primary_key=True),
    Column("key", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("claim", String(32), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("result", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)


class JournalState(StrEnum):
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"


class JournalConflict(RuntimeError):
    """A completion or failure was reported for a key that is not in the ``started`` state."""


@dataclass(frozen=True)
class JournalEntry:
    """One key's row: its state, the stored JSON result (once completed) and how often it was claimed."""

    scope: str
    key: str
    state: JournalState
    attempts: int
    result: Any
    error: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Claim:
    """What :meth:`ReplayJournal.begin` decided; ``entry`` is the row after the decision."""

    status: Literal["claimed", "completed", "in_doubt"]
    entry: JournalEntry

    @property
    def result(self) -> Any:
        """The stored result of a completed entry (a replay)."""
        return self.entry.result


def key_digest(key: str) -> str:
    """sha256 hex of an idempotency key: what audit records carry instead of the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ReplayJournal:
    """The journal of one ``scope`` in the governance store (tables are created on first use)."""

    def __init__(self, engine: Engine, scope: str) -> None:
        if not scope or len(scope) > 64:
            raise ValueError("scope must be 1-64 characters, e.g. 'tool' or 'batch'")
        self._engine = engine
        self.scope = scope
        ensure_tables(engine, [journal_table])

    def begin(self, key: str, *, reclaim_in_doubt: bool = False) -> Claim:
        """Claim ``key`` for doing its work now, or say that it was done (or may have been) before."""
        if not key:
            raise ValueError("an idempotency key must not be empty")
        token = uuid.uuid4().hex
        digest = key_digest(key)
        now = utc_now()
        with write_transaction(self._engine) as connection:
            insert_if_missing(
                connection,
                journal_table,
                {
                    "scope": self.scope,
                    "key_sha256": digest,
                    "key": key,
                    "state": JournalState.STARTED.value,
                    "claim": token,
                    "attempts": 1,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            row = self._lock_row(connection, digest)
            if row["claim"] == token:
                return Claim("claimed", _entry(row))
            state = JournalState(row["state"])
            if state is JournalState.COMPLETED:
                return Claim("completed", _entry(row))
            if state is JournalState.STARTED and not reclaim_in_doubt:
                return Claim("in_doubt", _entry(row))
            # A clean failure (or in-doubt work the caller says is safe to repeat): claim it again.
            connection.execute(
                self._row(update(journal_table), digest).values(
                    state=JournalState.STARTED.value,
                    claim=token,
                    attempts=journal_table.c.attempts + 1,
                    error=None,
                    updated_at=now,
                )
            )
            return Claim("claimed", _entry(self._lock_row(connection, digest)))

    def complete(self, key: str, result: Any) -> JournalEntry:
        """Record the JSON ``result`` of claimed work; later :meth:`begin` calls replay it."""
        try:
            encoded = canonical_json(result)
        except (TypeError, ValueError) as error:
            raise ValueError(f"a journaled result must be JSON (no NaN/Infinity): {error}") from error
        if len(encoded.encode()) > MAX_RESULT_BYTES:
            raise ValueError(f"a journaled result must be at most {MAX_RESULT_BYTES} bytes as JSON")
        return self._finish(key, JournalState.COMPLETED, result=encoded, error=None)

    def fail(self, key: str, error: str) -> JournalEntry:
        """Record that claimed work failed without effect; the next :meth:`begin` claims it again.

        Also the way to resolve an in-doubt entry by hand after checking that its effect did not happen.
        """
        return self._finish(key, JournalState.FAILED, result=None, error=error[:4000])

    def lookup(self, key: str) -> JournalEntry | None:
        """The entry for ``key``, or None if it was never claimed."""
        with read_transaction(self._engine) as connection:
            row = connection.execute(self._row(select(journal_table), key_digest(key))).mappings().first()
        return None if row is None else _entry(row)

    def _finish(
        self, key: str, state: JournalState, *, result: str | None, error: str | None
    ) -> JournalEntry:
        digest = key_digest(key)
        with write_transaction(self._engine) as connection:
            row = self._locked_row(connection, digest)
            if row is None or row["state"] != JournalState.STARTED.value:
                found = "no entry" if row is None else f"state {row['state']!r}"
                raise JournalConflict(
                    f"cannot mark {self.scope} journal key as {state.value}: expected state 'started', found "
                    f"{found} (key sha256 {digest[:16]})"
                )
            connection.execute(
                self._row(update(journal_table), digest).values(
                    state=state.value, result=result, error=error, updated_at=utc_now()
                )
            )
            return _entry(self._lock_row(connection, digest))

    def _row(self, statement: Any, digest: str) -> Any:
        return statement.where(journal_table.c.scope == self.scope, journal_table.c.key_sha256 == digest)

    def _locked_row(self, connection: Connection, digest: str) -> RowMapping | None:
        query = self._row(select(journal_table), digest).with_for_update()
        row: RowMapping | None = connection.execute(query).mappings().first()
        return row

    def _lock_row(self, connection: Connection, digest: str) -> RowMapping:
        row = self._locked_row(connection, digest)
        if row is None:  # pragma: no cover - rows are never deleted by this class
            raise JournalConflict(f"{self.scope} journal entry {digest[:16]} vanished")
        return row


def _entry(row: RowMapping) -> JournalEntry:
    return JournalEntry(
        scope=row["scope"],
        key=row["key"],
        state=JournalState(row["state"]),
        attempts=int(row["attempts"]),
        result=None if row["result"] is None else json.loads(row["result"]),
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
