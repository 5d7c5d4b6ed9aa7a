"""Append-only, hash-chained audit trail of every governed action.

Each stored record gets the next ``seq`` and ``hash = sha256(prev_hash || canonical JSON of the record
with its seq)``, where ``prev_hash`` is the hash of the record before it (64 zeros for the first). Editing,
deleting or reordering rows behind the store's back therefore breaks the chain, and :meth:`AuditStore.verify`
says where and how. A one-row "chain head" (last seq and hash) is updated in the same transaction as every
append; it serialises concurrent writers (row lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) and lets
verification notice rows cut off the end of the chain.

The store records what it is given: redaction happens before a record is built, never here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Engine,
    Float,
    Index,
    Integer,
    RowMapping,
    String,
    Table,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.engine import Connection

from governed_ai.core.sqlstore import (
    UtcDateTime,
    as_utc,
    ensure_tables,
    governance_metadata,
    insert_if_missing,
    read_transaction,
    utc_now,
    write_transaction,
)
from governed_ai.core.subject import Subject

#: ``prev_hash`` of the first record of a chain.
GENESIS_HASH = "0" * 64
# "extra" is for small structured context, not payloads: keep rows small and exports readable.
logger = logging.getLogger(__name__)
MAX_EXTRA_BYTES = 16_384
_VERIFY_CHUNK = 2_000
_EXPORT_CHUNK = 1_000
_HEAD_ID = 1

Decision = Literal["allow", "deny", "n/a"]

audit_table = Table(
    "governed_ai_audit",
    governance_metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time", UtcDateTime, nullable=False),
    Column("dag_id", String, nullable=True),
    Column("run_id", String, nullable=True),
    Column("task_id", String, nullable=True),
    Column("try_number", Integer, nullable=True),
    Column("map_index", Integer, nullable=True),
    Column("action", String, nullable=False),
    Column("resource", String, nullable=True),
    Column("decision", String(8), nullable=False),
    Column("rule", String, nullable=True),
    Column("model", String, nullable=True),
    Column("prompt_version", String, nullable=True),
    Column("prompt_tokens", BigInteger, nullable=True),
    Column("completion_tokens", BigInteger, nullable=True),
    Column("cost_usd", Float, nullable=True),
    Column("latency_ms", Float, nullable=True),
    Column("outcome", String, nullable=False),
    Column("error", Text, nullable=True),
    Column("content", Text, nullable=True),
    Column("extra", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_governed_ai_audit_dag_run", "dag_id", "run_id"),
    Index("ix_governed_ai_audit_time", "time"),
    Index("ix_governed_ai_audit_action", "action"),
)

audit_head_table = Table(
    "governed_ai_audit_head",
    governance_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

_AUDIT_TABLES = (audit_table, audit_head_table)


class AuditObserver(Protocol):
    """Called with records right after they are stored (metrics, trace spans)."""

    def __call__(self, records: Sequence[AuditRecord]) -> None: ...


class AuditRecord(BaseModel):
    """One governed action: who (the Airflow task), what, the policy decision and the outcome."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    time: datetime = Field(default_factory=utc_now, description="when it happened, UTC")
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    try_number: int | None = None
    map_index: int | None = None
    action: str = Field(min_length=1, description="model.call, tool.call, collection.read, budget.deny, ...")
    resource: str | None = Field(default=None, description="model, tool or collection the action was on")
    decision: Decision = "n/a"
    rule: str | None = Field(default=None, description="name of the policy rule that decided")
    model: str | None = None
    prompt_version: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    outcome: str = Field(default="ok", min_length=1, description="ok, error, denied, ...")
    error: str | None = None
    content: str | None = Field(default=None, description="already-redacted text, if content is audited")
    extra: dict[str, Any] = Field(default_factory=dict, description="small JSON-able context")

    @field_validator("time")
    @classmethod
    def _time_utc(cls, value: datetime) -> datetime:
        return as_utc(value)

    @field_validator("dag_id", "run_id", "task_id", "action", "resource", "rule", "model", "error", "content")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # PostgreSQL text cannot hold NUL; replacing it here (before hashing) keeps both backends equal.
        return None if value is None else value.replace("\x00", "\ufffd")

    @field_validator("extra")
    @classmethod
    def _extra_is_small_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            encoded = canonical_json(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"extra must be JSON-serialisable: {error}") from error
        if len(encoded.encode()) > MAX_EXTRA_BYTES:
            raise ValueError(f"extra is larger than {MAX_EXTRA_BYTES} bytes; put large payloads elsewhere")
        # Keep exactly what a round trip through the database gives back (tuples become lists, ...),
        # so the hash of a fresh record and of the stored one are computed from the same data.
        decoded: dict[str, Any] = json.loads(encoded)
        return decoded

    @classmethod
    def for_subject(cls, subject: Subject, *, action: str, **fields: Any) -> Self:
        """A record about an action taken on behalf of ``subject`` (the Airflow task identity);
        ``fields`` fill in the rest and may override the subject's own values."""
        identity: dict[str, Any] = {
            "dag_id": subject.dag_id,
            "run_id": subject.run_id,
            "task_id": subject.task_id,
            "try_number": subject.try_number,
            "map_index": subject.map_index,
        }
        return cls(**{**identity, **fields, "action": action})


class StoredAuditRecord(AuditRecord):
    """An :class:`AuditRecord` as stored: with its place in the chain."""

    seq: int
    prev_hash: str
    hash: str


class ChainVerification(BaseModel):
    """Result of :meth:`AuditStore.verify`."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    records_checked: int
    first_bad_seq: int | None = None
    problem: str | None = Field(
        default=None, description="what is wrong, e.g. 'hash mismatch at seq 17 (row edited)'"
    )
    head_seq: int = Field(description="last seq the chain head records")
    head_hash: str = Field(description="hash of the last record; keep a copy elsewhere to anchor the chain")


_HASHED_FIELDS: tuple[str, ...] = tuple(AuditRecord.model_fields)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 text, no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _format_time(moment: datetime) -> str:
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def chain_hash(prev_hash: str, seq: int, record: AuditRecord) -> str:
    """``sha256(prev_hash || canonical JSON of the record's fields and seq)`` as hex.

    Public so that the chain can be checked by tools that read an export instead of the database.
    """
    fields: dict[str, Any] = {name: getattr(record, name) for name in _HASHED_FIELDS}
    fields["time"] = _format_time(record.time)
    fields["seq"] = seq
    return hashlib.sha256((prev_hash + canonical_json(fields)).encode("utf-8")).hexdigest()


class AuditStore:
    """Append-only audit trail in a SQL database; safe for many writer processes at once.

    There are deliberately no update or delete methods.
    """

    def __init__(self, engine: Engine, observers: Sequence[AuditObserver] = ()) -> None:
        self._engine = engine
        self.observers: list[AuditObserver] = list(observers)
        ensure_tables(engine, _AUDIT_TABLES)

    @property
    def engine(self) -> Engine:
        """The governance store's engine (the replay journal lives in the same database)."""
        return self._engine

    # -- writing ----------------------------------------------------------------------------------

    def append(self, record: AuditRecord) -> StoredAuditRecord:
        """Store one record at the end of the chain."""
        return self.append_many([record])[0]

    def append_many(self, records: Iterable[AuditRecord]) -> list[StoredAuditRecord]:
        """Store records in order, in one transaction with one batched INSERT."""
        batch = list(records)
        if not batch:
            return []
        with write_transaction(self._engine) as connection:
            stored = self.append_in(connection, batch)
        self.notify(batch)
        return stored

    def append_in(self, connection: Connection, batch: Sequence[AuditRecord]) -> list[StoredAuditRecord]:
        """Append ``batch`` inside the caller's write transaction (the group-commit writer's); the caller
        calls :meth:`notify` once it has committed."""
        if not batch:
            return []
        seq, prev_hash = self._lock_head(connection)
        stored: list[StoredAuditRecord] = []
        rows: list[dict[str, Any]] = []
        for record in batch:
            seq += 1
            digest = chain_hash(prev_hash, seq, record)
            values = {name: getattr(record, name) for name in _HASHED_FIELDS}
            # Already validated as an AuditRecord; re-validating 500 records per batch is pure cost.
            stored.append(
                StoredAuditRecord.model_construct(**values, seq=seq, prev_hash=prev_hash, hash=digest)
            )
            rows.append(
                {
                    **values,
                    "extra": canonical_json(record.extra),
                    "seq": seq,
                    "prev_hash": prev_hash,
                    "hash": digest,
                }
            )
            prev_hash = digest
        connection.execute(audit_table.insert(), rows)
        connection.execute(
            update(audit_head_table).where(audit_head_table.c.id == _HEAD_ID).values(seq=seq, hash=prev_hash)
        )
        return stored

    def notify(self, records: Sequence[AuditRecord]) -> None:
        # After the commit: observers see only what is really in the trail, and their failures (a metrics
        # backend down, a tracing bug) must never undo or fail the governed action.
        for observer in self.observers:
            try:
                observer(records)
            except Exception:
                logger.warning("audit observer %r failed; continuing", observer, exc_info=True)

    @staticmethod
    def _lock_head(connection: Connection) -> tuple[int, str]:
        head = audit_head_table
        query = select(head.c.seq, head.c.hash).where(head.c.id == _HEAD_ID).with_for_update()
        row = connection.execute(query).first()
        if row is None:
            insert_if_missing(connection, head, {"id": _HEAD_ID, "seq": 0, "hash": GENESIS_HASH})
            row = connection.execute(query).one()
        return int(row.seq), str(row.hash)

    # -- verification -----------------------------------------------------------------------------

    def verify(self) -> ChainVerification:
        """Walk the whole chain in seq order, in chunks, and report the first inconsistency."""
        with read_transaction(self._engine) as connection:
            head = connection.execute(
                select(audit_head_table.c.seq, audit_head_table.c.hash).where(
                    audit_head_table.c.id == _HEAD_ID
                )
            ).first()
            head_seq, head_hash = (int(head.seq), str(head.hash)) if head is not None else (0, GENESIS_HASH)
            checked = 0
            prev_seq, prev_hash = 0, GENESIS_HASH

            def result(first_bad_seq: int | None, problem: str | None) -> ChainVerification:
                return ChainVerification(
                    ok=problem is None,
                    records_checked=checked,
                    first_bad_seq=first_bad_seq,
                    problem=problem,
                    head_seq=head_seq,
                    head_hash=head_hash,
                )

            # Only rows up to the head read above: later rows belong to appends that committed since.
            for row in self._rows_in_seq_order(connection, upper_seq=head_seq, chunk=_VERIFY_CHUNK):
                seq = int(row["seq"])
                if seq != prev_seq + 1:
                    where = f"after seq {prev_seq}" if prev_seq else f"before seq {seq}"
                    return result(prev_seq + 1, f"gap {where} (row deleted)")
                if row["prev_hash"] != prev_hash:
                    if prev_seq == 0:
                        return result(seq, f"prev_hash at seq {seq} is not the genesis hash (row edited)")
                    return result(
                        seq, f"prev_hash at seq {seq} does not match seq {prev_seq} (rows reordered)"
                    )
                if chain_hash(row["prev_hash"], seq, _record_from_row(row)) != row["hash"]:
                    return result(seq, f"hash mismatch at seq {seq} (row edited)")
                checked += 1
                prev_seq, prev_hash = seq, row["hash"]

            if prev_seq < head_seq:
                return result(
                    prev_seq + 1, f"chain ends at seq {prev_seq} but its head says {head_seq} (rows deleted)"
                )
            if prev_hash != head_hash:
                return result(head_seq, f"hash of seq {head_seq} does not match the chain head (head edited)")
            # One statement, so it sees one snapshot: rows above the head then were not written by append.
            current_head_seq = func.coalesce(
                select(audit_head_table.c.seq).where(audit_head_table.c.id == _HEAD_ID).scalar_subquery(), 0
            )
            beyond_head = connection.execute(
                select(func.min(audit_table.c.seq)).where(audit_table.c.seq > current_head_seq)
            ).scalar()
            if beyond_head is not None:
                return result(
                    int(beyond_head), f"row at seq {beyond_head} lies beyond the chain head (row inserted)"
                )
            return result(None, None)

    # -- reading ----------------------------------------------------------------------------------

    def query(
        self,
        *,
        dag_id: str | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
        action: str | None = None,
        decision: Decision | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = 100,
        order: Literal["asc", "desc"] = "desc",
    ) -> list[StoredAuditRecord]:
        """Records matching every given filter; ``since`` is inclusive, ``until`` exclusive.

        Newest first by default; ``limit=None`` returns everything that matches.
        """
        conditions = _filter_conditions(dag_id, run_id, task_id, action, decision, since, until)
        statement = select(audit_table).where(*conditions)
        statement = statement.order_by(
            audit_table.c.seq.desc() if order == "desc" else audit_table.c.seq.asc()
        )
        if limit is not None:
            statement = statement.limit(limit)
        with read_transaction(self._engine) as connection:
            return [_stored_from_row(row) for row in connection.execute(statement).mappings()]

    def tail(self, n: int = 20) -> list[StoredAuditRecord]:
        """The last ``n`` records, oldest of them first."""
        return list(reversed(self.query(limit=n, order="desc")))

    def export_jsonl(
        self,
        file: str | os.PathLike[str] | IO[str],
        *,
        dag_id: str | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
        action: str | None = None,
        decision: Decision | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """Write matching records, oldest first, one JSON object per line (with seq and hashes);
        streams in chunks. Returns how many were written."""
        conditions = _filter_conditions(dag_id, run_id, task_id, action, decision, since, until)
        if isinstance(file, str | os.PathLike):
            with Path(file).open("w", encoding="utf-8") as handle:
                return self._export(handle, conditions)
        return self._export(file, conditions)

    def _export(self, handle: IO[str], conditions: Sequence[ColumnElement[bool]]) -> int:
        written = 0
        with read_transaction(self._engine) as connection:
            for row in self._rows_in_seq_order(connection, conditions=conditions, chunk=_EXPORT_CHUNK):
                handle.write(_stored_from_row(row).model_dump_json())
                handle.write("\n")
                written += 1
        return written

    @staticmethod
    def _rows_in_seq_order(
        connection: Connection,
        *,
        chunk: int,
        upper_seq: int | None = None,
        conditions: Sequence[ColumnElement[bool]] = (),
    ) -> Iterator[RowMapping]:
        # Keyset pagination: each chunk starts after the last seq seen, so memory stays at one chunk
        # and no OFFSET scan grows with the table.
        last_seq = 0
        while True:
            statement = select(audit_table).where(audit_table.c.seq > last_seq, *conditions)
            if upper_seq is not None:
                statement = statement.where(audit_table.c.seq <= upper_seq)
            rows = connection.execute(statement.order_by(audit_table.c.seq).limit(chunk)).mappings().all()
            yield from rows
            if len(rows) < chunk:
                return
            last_seq = int(rows[-1]["seq"])


def _filter_conditions(
    dag_id: str | None,
    run_id: str | None,
    task_id: str | None,
    action: str | None,
    decision: str | None,
    since: datetime | None,
    until: datetime | None,
) -> list[ColumnElement[bool]]:
    table = audit_table
    conditions: list[ColumnElement[bool]] = []
    for column, value in (
        (table.c.dag_id, dag_id),
        (table.c.run_id, run_id),
        (table.c.task_id, task_id),
        (table.c.action, action),
        (table.c.decision, decision),
    ):
        if value is not None:
            conditions.append(column == value)
    if since is not None:
        conditions.append(table.c.time >= as_utc(since))
    if until is not None:
        conditions.append(table.c.time < as_utc(until))
    return conditions


def _record_fields_from_row(row: RowMapping) -> dict[str, Any]:
    fields = {name: row[name] for name in _HASHED_FIELDS}
    fields["extra"] = json.loads(row["extra"])
    return fields


def _record_from_row(row: RowMapping) -> AuditRecord:
    # model_construct: a tampered row must still be hashed as it is, not rejected by validation.
    return AuditRecord.model_construct(**_record_fields_from_row(row))


def _stored_from_row(row: RowMapping) -> StoredAuditRecord:
    return StoredAuditRecord.model_construct(
        **_record_fields_from_row(row), seq=int(row["seq"]), prev_hash=row["prev_hash"], hash=row["hash"]
    )
