"""Append-only, keyed hash chain of every governed action, anchored outside the database.

Each stored record gets the next ``seq`` and ``hash = HMAC-SHA256(k, prev_hash || canonical JSON of the
record with its seq)``, where ``prev_hash`` is the hash of the record before it (64 zeros for the first) and
``k`` is the audit sub-key of the deployment's secret (:mod:`governed_ai.core.keys`), which is never stored in
the governance database. Editing, deleting or reordering rows behind the store's back breaks the chain, and
without the key nobody can recompute a chain that verifies. A one-row "chain head" (last seq and hash) is
updated in the same transaction as every append; it serialises concurrent writers (row lock on PostgreSQL,
``BEGIN IMMEDIATE`` on SQLite) and lets verification notice rows cut off the end of the chain.

Someone who can write the database could still cut the newest records and move the head back. So the
writer also copies the head, every ``anchor_every_records`` records or ``anchor_every_seconds`` seconds, to
an :class:`~governed_ai.core.audit_anchors.AnchorLog` outside the database (and logs it), and
:meth:`AuditStore.verify` checks the chain against those anchors.

:meth:`AuditStore.verify` answers ``ok`` only when it could check everything: without the key the status is
``unverifiable``, without anchors (for a non-empty chain) ``unanchored``; neither is ``ok``.

The store records what it is given: redaction happens before a record is built, never here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.engine import Connection

from governed_ai.core.audit_anchors import Anchor, AnchorLog
from governed_ai.core.keys import DeploymentKey, KeyedHasher
from governed_ai.core.sqlstore import (
    UtcDateTime,
    as_utc,
    ensure_tables,
    governance_metadata,
    insert_if_missing,
    prepared_write,
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

# The group-commit writer's statements, built once (prepared per dialect by sqlstore.prepared_write).
_INSERT_RECORDS = audit_table.insert()
_LOCK_HEAD = (
    select(audit_head_table.c.seq, audit_head_table.c.hash)
    .where(audit_head_table.c.id == _HEAD_ID)
    .with_for_update()
)
_MOVE_HEAD = (
    update(audit_head_table)
    .where(audit_head_table.c.id == _HEAD_ID)
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)

#: Purpose of the deployment key's sub-key that chains audit records.
CHAIN_PURPOSE = "audit-chain"
#: Defaults of the writer's anchoring cadence.
ANCHOR_EVERY_RECORDS = 1_000
ANCHOR_EVERY_SECONDS = 60.0

ChainStatusName = Literal["ok", "broken", "unverifiable", "unanchored", "error"]


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
    """Result of :meth:`AuditStore.verify`.

    ``ok`` is true only for status ``ok``: every record's keyed hash checked, the head consistent, and
    every anchor found in the chain. ``broken`` means tampering (or a wrong key) was detected;
    ``unverifiable`` that no key was available to check the hashes; ``unanchored`` that the hashes are
    fine but no anchor exists outside the database, so a cut-off tail could not have been noticed;
    ``error`` (set by callers such as the UI) that verification itself failed to run.
    """

    model_config = ConfigDict(frozen=True)

    ok: bool
    status: ChainStatusName = "ok"
    records_checked: int
    first_bad_seq: int | None = None
    problem: str | None = Field(
        default=None, description="what is wrong, e.g. 'hash mismatch at seq 17 (row edited)'"
    )
    head_seq: int = Field(description="last seq the chain head records")
    head_hash: str = Field(description="hash of the last record; keep a copy elsewhere to anchor the chain")
    key_id: str | None = Field(default=None, description="public id of the key the hashes were checked with")
    anchors_checked: int = Field(default=0, description="anchors (copies of the head kept outside) checked")
    newest_anchor_seq: int | None = None
    anchor_location: str | None = Field(default=None, description="where the anchors were read from")


_HASHED_FIELDS: tuple[str, ...] = tuple(AuditRecord.model_fields)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 text, no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _format_time(moment: datetime) -> str:
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def chain_payload(prev_hash: str, seq: int, record: AuditRecord) -> bytes:
    """What a record's chain hash is computed over: ``prev_hash || canonical JSON of its fields and seq``."""
    fields: dict[str, Any] = {name: getattr(record, name) for name in _HASHED_FIELDS}
    fields["time"] = _format_time(record.time)
    fields["seq"] = seq
    return (prev_hash + canonical_json(fields)).encode("utf-8")


def chain_hasher(key: DeploymentKey) -> KeyedHasher:
    """The keyed hasher of the audit chain under ``key``."""
    return key.hasher(CHAIN_PURPOSE)


def chain_hash(prev_hash: str, seq: int, record: AuditRecord, key: DeploymentKey | KeyedHasher) -> str:
    """``HMAC-SHA256(audit sub-key, chain_payload(...))`` as hex: the hash a keyed store writes.

    Public so that the chain can be checked by tools that read an export instead of the database (they
    need the key too).
    """
    hasher = key if isinstance(key, KeyedHasher) else chain_hasher(key)
    return hasher.hexdigest(chain_payload(prev_hash, seq, record))


def unkeyed_chain_hash(prev_hash: str, seq: int, record: AuditRecord) -> str:
    """Plain ``sha256(chain_payload(...))``: what a store without a key writes (and what releases before
    the keyed chain wrote). Anyone can compute it, so it proves nothing; verification uses it only to
    explain a mismatch."""
    return hashlib.sha256(chain_payload(prev_hash, seq, record)).hexdigest()


class AuditStore:
    """Append-only audit trail in a SQL database; safe for many writer processes at once.

    There are deliberately no update or delete methods.
    """

    def __init__(
        self,
        engine: Engine,
        observers: Sequence[AuditObserver] = (),
        *,
        key: DeploymentKey | None = None,
        anchors: AnchorLog | None = None,
        anchor_every_records: int = ANCHOR_EVERY_RECORDS,
        anchor_every_seconds: float = ANCHOR_EVERY_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``key`` chains the records with HMAC (without it they get a plain SHA-256 chain that
        :meth:`verify` can never call ``ok``); ``anchors`` receives a copy of the head after an append once
        ``anchor_every_records`` records or ``anchor_every_seconds`` seconds have passed since this
        process's last anchor (and after the first append of the process)."""
        if anchor_every_records < 1:
            raise ValueError("anchor_every_records must be at least 1")
        if anchor_every_seconds < 0 or math.isnan(anchor_every_seconds):
            raise ValueError("anchor_every_seconds must not be negative")
        self._engine = engine
        self.observers: list[AuditObserver] = list(observers)
        self._key = key
        self._hasher = chain_hasher(key) if key is not None else None
        self._anchors = anchors
        self._anchor_every_records = anchor_every_records
        self._anchor_every_seconds = anchor_every_seconds
        self._monotonic = monotonic
        self._anchor_lock = threading.Lock()
        self._last_anchor: tuple[int, float] | None = None  # (seq, monotonic time) of this process's last
        self._chain_id: str | None = None
        self._last_appended_seq: int | None = None  # newest seq this process appended
        self._warned_unkeyed = False
        ensure_tables(engine, _AUDIT_TABLES)

    @property
    def key(self) -> DeploymentKey | None:
        """The deployment key the chain is written and checked with (None: unkeyed)."""
        return self._key

    @property
    def anchors(self) -> AnchorLog | None:
        """Where the chain head is anchored, if anywhere."""
        return self._anchors

    @property
    def chain_id(self) -> str | None:
        """The hash of the chain's first record (None while it is empty): names the chain's anchors.

        Derived from the chain itself, so no row in the database can re-point the anchors: changing the
        first record changes this id, and breaks the keyed chain anyway.
        """
        if self._chain_id is None:
            with read_transaction(self._engine) as connection:
                found = connection.execute(select(audit_table.c.hash).where(audit_table.c.seq == 1)).scalar()
            if found is not None:
                self._chain_id = str(found)
        return self._chain_id

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
        stored: list[StoredAuditRecord] = []
        with write_transaction(self._engine) as connection:
            head = self.append_in(connection, batch, stored=stored)
        self.after_commit(batch, head)
        return stored

    def append_in(
        self,
        connection: Connection,
        batch: Sequence[AuditRecord],
        *,
        stored: list[StoredAuditRecord] | None = None,
    ) -> tuple[int, str] | None:
        """Append ``batch`` inside the caller's write transaction (the group-commit writer's) and return the
        chain's new head ``(seq, hash)``; the caller calls :meth:`after_commit` with it once it has
        committed. ``stored``: a list to add the records as stored to (the writer needs only the head)."""
        if not batch:
            return None
        hasher = self._hasher
        if hasher is None and not self._warned_unkeyed:
            self._warned_unkeyed = True
            logger.warning(
                "audit store has no key: records are chained with plain SHA-256, which anyone can "
                "recompute, and verification will report the chain as unverifiable"
            )
        seq, prev_hash = self._lock_head(connection)
        rows: list[dict[str, Any]] = []
        for record in batch:
            seq += 1
            payload = chain_payload(prev_hash, seq, record)
            digest = hasher.hexdigest(payload) if hasher is not None else hashlib.sha256(payload).hexdigest()
            if seq == 1:
                self._chain_id = digest
            values = {name: getattr(record, name) for name in _HASHED_FIELDS}
            if stored is not None:
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
        prepared_write(connection, _INSERT_RECORDS, list(rows[0])).execute(connection, rows)
        prepared_write(connection, _MOVE_HEAD).execute(connection, [{"new_seq": seq, "new_hash": prev_hash}])
        return seq, prev_hash

    def after_commit(
        self, records: Sequence[AuditRecord], head: tuple[int, str] | None, *, notify: bool = True
    ) -> None:
        """What follows a committed append: anchor the head when one is due, then tell the observers
        (unless ``notify`` is False: the caller calls :meth:`notify` itself, later)."""
        if head is not None:
            self._last_appended_seq = head[0]
            self._maybe_anchor(*head)
        if notify:
            self.notify(records)

    # -- anchoring ----------------------------------------------------------------------------------

    def _maybe_anchor(self, seq: int, head_hash: str) -> None:
        if self._anchors is None or self._key is None:
            return
        with self._anchor_lock:
            now = self._monotonic()
            last = self._last_anchor
            due = (
                last is None
                or seq - last[0] >= self._anchor_every_records
                or now - last[1] >= self._anchor_every_seconds
            )
            if not due or (last is not None and seq <= last[0]):
                return
            self._write_anchor(seq, head_hash, now)

    def anchor(self, *, only_if_behind: bool = False) -> Anchor | None:
        """Anchor the current chain head now (e.g. at the end of a task); None without a key, an anchor
        location or records. With ``only_if_behind``, only if this process appended records since its last
        anchor. Never raises: a failed anchor is logged, the governed work goes on."""
        if self._anchors is None or self._key is None:
            return None
        if only_if_behind:
            last = self._last_anchor
            if self._last_appended_seq is None or (last is not None and last[0] >= self._last_appended_seq):
                return None
        try:
            with read_transaction(self._engine) as connection:
                head = connection.execute(
                    select(audit_head_table.c.seq, audit_head_table.c.hash).where(
                        audit_head_table.c.id == _HEAD_ID
                    )
                ).first()
        except Exception:
            logger.exception("could not read the audit chain head to anchor it")
            return None
        if head is None or int(head.seq) == 0:
            return None
        with self._anchor_lock:
            return self._write_anchor(int(head.seq), str(head.hash), self._monotonic())

    def _write_anchor(self, seq: int, head_hash: str, now: float) -> Anchor | None:
        assert self._anchors is not None and self._key is not None
        try:
            chain_id = self.chain_id
            if chain_id is None:  # pragma: no cover - an anchored seq always has a first record
                return None
            anchor = Anchor.make(self._key, chain_id, seq, head_hash, utc_now())
            self._anchors.write(chain_id, anchor)
        except Exception:
            # The record itself is committed; a missing anchor shows up as a verification finding.
            logger.exception("could not write the audit chain anchor to %s", self._anchors.location)
            return None
        self._last_anchor = (seq, now)
        # The task log is a second copy outside the database.
        logger.info(
            "audit chain anchored: chain %s seq %d head %s at %s (%s)",
            chain_id[:16], seq, head_hash, anchor.time.isoformat(), self._anchors.describe(chain_id),
        )  # fmt: skip
        return anchor

    def notify(self, records: Sequence[AuditRecord]) -> None:
        """Hand committed ``records`` to the observers (metrics, spans)."""
        # After the commit: observers see only what is really in the trail, and their failures (a metrics
        # backend down, a tracing bug) must never undo or fail the governed action.
        for observer in self.observers:
            try:
                observer(records)
            except Exception:
                logger.warning("audit observer %r failed; continuing", observer, exc_info=True)

    @staticmethod
    def _lock_head(connection: Connection) -> tuple[int, str]:
        query = prepared_write(connection, _LOCK_HEAD)
        row = query.first(connection)
        if row is None:
            insert_if_missing(connection, audit_head_table, {"id": _HEAD_ID, "seq": 0, "hash": GENESIS_HASH})
            row = query.first(connection)
        return int(row[0]), str(row[1])

    # -- verification -----------------------------------------------------------------------------

    def verify(self) -> ChainVerification:
        """Walk the whole chain in seq order, in chunks, check it against the anchors, and report the first
        inconsistency (see :class:`ChainVerification` for what each status means)."""
        hasher = self._hasher
        anchors: list[Anchor] = []
        anchor_problem: str | None = None
        unreadable = 0
        chain_id = self.chain_id
        if self._anchors is not None and hasher is not None and chain_id is not None:
            # Anchors first: every anchor read now was written after its records committed, so the
            # database snapshot taken below must reach it.
            try:
                found = self._anchors.read(chain_id)
                anchors, unreadable = found.anchors, found.unreadable
            except Exception as error:
                anchor_problem = f"cannot read the anchors at {self._anchors.location}: {error}"
        anchor_seqs = {anchor.seq for anchor in anchors}
        hashes_at_anchors: dict[int, str] = {}
        with read_transaction(self._engine) as connection:
            head = connection.execute(
                select(audit_head_table.c.seq, audit_head_table.c.hash).where(
                    audit_head_table.c.id == _HEAD_ID
                )
            ).first()
            head_seq, head_hash = (int(head.seq), str(head.hash)) if head is not None else (0, GENESIS_HASH)
            checked = 0
            prev_seq, prev_hash = 0, GENESIS_HASH

            def result(
                first_bad_seq: int | None, problem: str | None, status: ChainStatusName | None = None
            ) -> ChainVerification:
                final = status or ("ok" if problem is None else "broken")
                return ChainVerification(
                    ok=final == "ok",
                    status=final,
                    records_checked=checked,
                    first_bad_seq=first_bad_seq,
                    problem=problem,
                    head_seq=head_seq,
                    head_hash=head_hash,
                    key_id=self._key.key_id if self._key is not None else None,
                    anchors_checked=len(anchors),
                    newest_anchor_seq=anchors[-1].seq if anchors else None,
                    anchor_location=(
                        self._anchors.describe(chain_id)
                        if self._anchors is not None and chain_id is not None
                        else None
                    ),
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
                if hasher is not None:
                    payload = chain_payload(row["prev_hash"], seq, _record_from_row(row))
                    if not hasher.matches(payload, row["hash"]):
                        return result(seq, _hash_mismatch(seq, payload, row["hash"]))
                if seq in anchor_seqs:
                    hashes_at_anchors[seq] = row["hash"]
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

        if hasher is None or self._key is None:
            return result(
                None,
                "cannot verify: no audit key is configured, so the record hashes cannot be checked "
                "(anyone can recompute an unkeyed chain)",
                "unverifiable",
            )
        if anchor_problem is not None:
            return result(None, anchor_problem, "unanchored")
        for anchor in anchors:
            assert chain_id is not None
            if not anchor.authentic(self._key, chain_id):
                other = "" if anchor.key_id == self._key.key_id else f" (key id {anchor.key_id})"
                return result(
                    anchor.seq,
                    f"the anchor of seq {anchor.seq} at {anchor.time.isoformat()} is not authentic: forged, "
                    f"edited, or written with another key{other}",
                )
            if anchor.seq > head_seq:
                return result(
                    head_seq + 1,
                    f"an anchor says the chain reached seq {anchor.seq} (hash {anchor.hash[:16]}...) at "
                    f"{anchor.time.isoformat()}, but it now ends at seq {head_seq}: records were cut off "
                    "the end and the head moved back",
                )
            if hashes_at_anchors.get(anchor.seq) != anchor.hash:
                return result(anchor.seq, f"hash of seq {anchor.seq} differs from its anchor (row replaced)")
        if unreadable:
            return result(None, f"{unreadable} anchor entries could not be read (edited or corrupted)")
        if head_seq > 0 and not anchors:
            where = "no anchor location is configured"
            if self._anchors is not None:
                where = f"no anchor found at {self._anchors.describe(chain_id or '<no store id>')}"
            return result(
                None,
                f"not anchored: {where}, so records cut off the end of the chain could go unnoticed",
                "unanchored",
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


def _hash_mismatch(seq: int, payload: bytes, stored_hash: str) -> str:
    if hashlib.sha256(payload).hexdigest() == stored_hash:
        return (
            f"hash at seq {seq} is a plain SHA-256, not the HMAC of this deployment's key: the chain was "
            "written without the key (by an older version or a store without a key) or recomputed by "
            "someone who does not have it"
        )
    return f"hash mismatch at seq {seq} (row edited, or the chain was written with another key)"


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
