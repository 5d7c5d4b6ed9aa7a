"""The governed response cache: replies the policy lets later tasks reuse instead of paying again.

Off unless a policy rule turns it on for a model (``cache: {models, ttl_seconds, outputs}``, see
:mod:`governed_ai.core.policy.document`). :class:`~governed_ai.core.client.GovernedClient` is the only
user: after authorizing, routing and redacting a request (and after the replay journal had nothing), it
looks the request up here; a hit is answered from the store (nothing reserved or sent, $0, audited as
``model.cache_hit`` / ``embedding.cache_hit``), a miss is paid for as usual and its reply stored in the
same group commit as its audit record and journal step (:class:`~governed_ai.core.store_writer.StoreWriter`).

What is stored, per entry: a keyed digest of everything that makes two requests the same (the caching
rule, scope, connection, concrete model, prompt version and the redacted request body as it would be
sent), the reply
as the journal keeps it with model output ALWAYS redacted (even when the policy lets outputs through
unredacted elsewhere), the prompt version in clear (so ``governed-ai cache purge --prompt-version`` can
find it), the connection/model and the rule that enabled it, and when it was stored. No prompt text, no
item key. Whether an entry may still be used is decided at lookup by the TTL of the policy *now*, so
shortening ``ttl_seconds`` takes effect at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Column, Engine, Index, String, Table, Text, and_, delete, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from governed_ai.core.audit import canonical_json
from governed_ai.core.sqlstore import (
    UtcDateTime,
    dialect_name,
    ensure_tables,
    governance_metadata,
    read_transaction,
    utc_now,
    write_transaction,
)

response_cache_table = Table(
    "governed_ai_response_cache",
    governance_metadata,
    Column("key_sha256", String(64), primary_key=True),
    Column("scope", String(16), nullable=False),  # chat | embed
    Column("resource", Text, nullable=False),  # connection/model, as in audit records
    Column("prompt_version", Text, nullable=True),
    Column("rule", Text, nullable=True),  # the policy rule that enabled caching when it was stored
    Column("result", Text, nullable=False),  # JSON: the redacted reply (chat) or the vectors (embed)
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_governed_ai_response_cache_prompt_version", "prompt_version"),
    Index("ix_governed_ai_response_cache_created_at", "created_at"),
)


def cache_key(
    digest: Callable[[str], str],
    rule: str,
    scope: str,
    connection_id: str,
    model: str,
    prompt_version: str | None,
    body: dict[str, Any],
) -> str:
    """The entry's key: the deployment's keyed digest of what makes two requests the same. ``body`` is the
    request as it would be sent (already redacted). The task instance is NOT part of it: that is what lets
    the next night's run reuse it. The policy ``rule`` that caches is: entries are shared by the tasks one
    rule matches, never across rules (the rule is the deployment's unit of trust)."""
    return digest(canonical_json(["response-cache", rule, scope, connection_id, model, prompt_version, body]))


@dataclass(frozen=True)
class CacheWrite:
    """One reply to store, applied by the store writer inside its group commit."""

    key_sha256: str
    scope: str
    resource: str
    prompt_version: str | None
    rule: str
    result: Any


@dataclass(frozen=True)
class CachedReply:
    """A stored reply still within the TTL it was looked up with."""

    result: Any
    created_at: datetime
    rule: str | None


@dataclass(frozen=True)
class CacheGroup:
    """What ``governed-ai cache status`` shows per scope and prompt version."""

    scope: str
    prompt_version: str | None
    entries: int
    oldest: datetime
    newest: datetime


def apply_cache_writes(connection: Connection, writes: Iterable[CacheWrite], *, now: datetime) -> None:
    """Store ``writes`` in the caller's transaction; an entry with the same key is replaced (the newer
    reply to the same request restarts its TTL)."""
    rows = [
        {
            "key_sha256": w.key_sha256,
            "scope": w.scope,
            "resource": w.resource,
            "prompt_version": w.prompt_version,
            "rule": w.rule,
            "result": json.dumps(w.result, separators=(",", ":"), ensure_ascii=False),
            "created_at": now,
        }
        for w in writes
    ]
    if not rows:
        return
    insert = postgresql_insert if dialect_name(connection) == "postgresql" else sqlite_insert
    statement = insert(response_cache_table)
    replaced = {name: statement.excluded[name] for name in ("resource", "rule", "result", "created_at")}
    connection.execute(statement.on_conflict_do_update(index_elements=["key_sha256"], set_=replaced), rows)


class ResponseCache:
    """Reads and purges the response cache table (writes go through the store writer)."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.engine = engine
        self.clock = clock
        ensure_tables(engine, [response_cache_table])

    def lookup(self, key_sha256: str, *, ttl_seconds: int) -> CachedReply | None:
        """The entry of ``key_sha256`` if it was stored less than ``ttl_seconds`` ago, else None."""
        table = response_cache_table
        not_before = self.clock() - timedelta(seconds=ttl_seconds)
        with read_transaction(self.engine) as connection:
            row = connection.execute(
                select(table.c.result, table.c.created_at, table.c.rule).where(
                    and_(table.c.key_sha256 == key_sha256, table.c.created_at >= not_before)
                )
            ).first()
        if row is None:
            return None
        return CachedReply(json.loads(row.result), row.created_at, row.rule)

    def purge(self, *, older_than: timedelta | None = None, prompt_version: str | None = None) -> int:
        """Delete entries stored more than ``older_than`` ago and/or of ``prompt_version`` (both given: only
        entries matching both); with neither, every entry. Returns how many were deleted."""
        table = response_cache_table
        conditions = []
        if older_than is not None:
            conditions.append(table.c.created_at < self.clock() - older_than)
        if prompt_version is not None:
            conditions.append(table.c.prompt_version == prompt_version)
        with write_transaction(self.engine) as connection:
            result = connection.execute(
                delete(table).where(and_(*conditions)) if conditions else delete(table)
            )
        return int(result.rowcount or 0)

    def status(self) -> list[CacheGroup]:
        """Entries per scope and prompt version, with the oldest and newest store time."""
        table = response_cache_table
        with read_transaction(self.engine) as connection:
            rows = connection.execute(
                select(
                    table.c.scope,
                    table.c.prompt_version,
                    func.count(),
                    func.min(table.c.created_at),
                    func.max(table.c.created_at),
                )
                .group_by(table.c.scope, table.c.prompt_version)
                .order_by(table.c.scope, table.c.prompt_version)
            ).all()
        return [
            CacheGroup(scope, version, int(n), oldest, newest) for scope, version, n, oldest, newest in rows
        ]


def parse_age(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``45s`` (or a plain number of seconds) as a timedelta."""
    units = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in units else "s"
    number = value[:-1] if value[-1:] in units else value
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(
            f"age {text!r} is not a number with an optional unit; expected e.g. 7d, 12h, 30m or 45s"
        ) from None
    if amount < 0:
        raise ValueError(f"age {text!r} is negative; expected e.g. 7d, 12h, 30m or 45s")
    return timedelta(seconds=amount * units[unit])
