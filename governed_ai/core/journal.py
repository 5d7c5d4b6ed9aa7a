"""The replay journal: every paid step is claimed before it is paid and completed before its slot is freed.

One table, one protocol, for every kind of step (``scope``): a request to a model (``chat``), to an
embedding endpoint (``embed``), a side-effecting tool call (``tool``).

- **claim** (state ``started``) right before the step is paid for, with the budget reservation it is
  charged to;
- **complete** with its JSON result and real usage once it returned, in the same group commit as its audit
  record, before the caller goes on; or **fail** when it raised without effect.

On an Airflow retry of the same task instance, a completed step is *replayed* from its result instead of
being paid for again. A step that was claimed but never completed is *in doubt*: the try that claimed it
died mid-step. A model request in doubt was probably served (and billed), so it is repeated and charged as
paid; a side-effecting tool call in doubt is not repeated unless the tool is idempotent (a human checks).

Keys are digests: a step's key is a digest of everything that makes it the same step (the task instance,
and for a model request its whole request body), and rows also carry a digest of the task instance, so a
try finds every step of its task instance in one query. With a deployment key, digests are keyed
(HMAC-SHA256), so not even the digest of an item key can be looked up by guessing. No raw item key, prompt
or argument is stored: ``label`` only says what kind of step it was.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    RowMapping,
    String,
    Table,
    Text,
    and_,
    bindparam,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from governed_ai.core.audit import canonical_json
from governed_ai.core.sqlstore import (
    UtcDateTime,
    dialect_name,
    ensure_tables,
    governance_metadata,
    insert_if_missing,
    prepared_write,
    read_transaction,
    utc_now,
    write_transaction,
)

# Results are replayed into prompts and XComs; a journal is not a blob store.
MAX_RESULT_BYTES = 1_000_000
_LOOKUP_CHUNK = 500

journal_table = Table(
    "governed_ai_journal",
    governance_metadata,
    Column("scope", String(64), primary_key=True),
    Column("key_sha256", String(64), primary_key=True),
    # What kind of step, never data: e.g. "chat fake-model" or "tool lookup_order".
    Column("key", Text, nullable=False, key="label"),
    Column("state", String(16), nullable=False),
    Column("claim", String(32), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("result", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("instance_sha256", String(64), nullable=True),
    Column("try_number", Integer, nullable=True),
    Column("reservation_id", String(36), nullable=True),
    Column("prompt_tokens", BigInteger, nullable=True),
    Column("completion_tokens", BigInteger, nullable=True),
    Column("cost_usd", Text, nullable=True),  # decimal text: exact on every backend
    Index("ix_governed_ai_journal_instance", "instance_sha256", "scope"),
)


class JournalState(StrEnum):
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"


class JournalConflict(RuntimeError):
    """A completion or failure was reported for a key that is not in the ``started`` state."""


def sha256_digest(text: str) -> str:
    """Unkeyed sha256 hex: the digest used when the deployment configured no key."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


Digest = Callable[[str], str]


@dataclass(frozen=True)
class JournalEntry:
    """One step's row: its state, the stored JSON result (once completed), usage and claims."""

    scope: str
    key_sha256: str
    label: str
    state: JournalState
    attempts: int
    result: Any
    error: str | None
    try_number: int | None
    reservation_id: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
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


# -- steps for the group-commit writer --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepClaim:
    """Mark a step as started (being paid for) by try ``try_number``, charged to ``reservation_id``."""

    scope: str
    key_sha256: str
    instance_sha256: str
    label: str
    try_number: int
    reservation_id: str | None


@dataclass(frozen=True, slots=True)
class StepDone:
    """A step returned: its JSON-ready result and what it really used."""

    scope: str
    key_sha256: str
    instance_sha256: str
    label: str
    try_number: int
    reservation_id: str | None
    result: Any
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class StepFailed:
    """A step raised without effect (nothing was paid): the next try may do it again."""

    scope: str
    key_sha256: str
    error: str


JournalStep = StepClaim | StepDone | StepFailed


class ReplayJournal:
    """The journal of one ``scope`` in the governance store (tables are created on first use).

    ``digest`` turns key material into the stored key (the deployment's keyed digest when there is one).
    """

    def __init__(self, engine: Engine, scope: str, *, digest: Digest = sha256_digest) -> None:
        if not scope or len(scope) > 64:
            raise ValueError("scope must be 1-64 characters, e.g. 'tool' or 'chat'")
        self._engine = engine
        self.scope = scope
        self.digest = digest
        ensure_tables(engine, [journal_table])

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- many steps of one task instance (the governed client) ------------------------------------------

    def entries_for_instance(self, instance_sha256: str) -> dict[str, JournalEntry]:
        """Every step of this scope that a try of the task instance claimed, by key digest."""
        table = journal_table
        with read_transaction(self._engine) as connection:
            rows = connection.execute(
                select(table).where(table.c.scope == self.scope, table.c.instance_sha256 == instance_sha256)
            ).mappings()
            return {row["key_sha256"]: _entry(row) for row in rows}

    def earlier_steps(self, instance_sha256: str, try_number: int) -> tuple[set[str], dict[str, int]]:
        """Key digests of this scope's steps that earlier tries of the task instance (before
        ``try_number``) completed, and those they claimed but never finished (in doubt, with the try that
        claimed them). Keys only, so a retry of a large batch does not load every stored result at once."""
        table = journal_table
        completed: set[str] = set()
        in_doubt: dict[str, int] = {}
        with read_transaction(self._engine) as connection:
            rows = connection.execute(
                select(table.c.key_sha256, table.c.state, table.c.try_number).where(
                    table.c.scope == self.scope,
                    table.c.instance_sha256 == instance_sha256,
                    or_(table.c.try_number < try_number, table.c.try_number.is_(None)),
                )
            )
            for key, state, claimed_by in rows:
                if state == JournalState.COMPLETED.value:
                    completed.add(key)
                elif state == JournalState.STARTED.value and claimed_by is not None:
                    in_doubt[key] = int(claimed_by)
        return completed, in_doubt

    def lookup_many(self, keys: Sequence[str]) -> dict[str, JournalEntry]:
        """Entries for these key digests (those that exist)."""
        table = journal_table
        found: dict[str, JournalEntry] = {}
        with read_transaction(self._engine) as connection:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                rows = connection.execute(
                    select(table).where(
                        table.c.scope == self.scope,
                        table.c.key_sha256.in_(keys[start : start + _LOOKUP_CHUNK]),
                    )
                ).mappings()
                found.update((row["key_sha256"], _entry(row)) for row in rows)
        return found

    # -- one step at a time (tool calls) ----------------------------------------------------------------

    def begin(
        self,
        key: str,
        *,
        reclaim_in_doubt: bool = False,
        label: str = "",
        instance: str | None = None,
        try_number: int | None = None,
    ) -> Claim:
        """Claim ``key`` for doing its work now, or say that it was done (or may have been) before."""
        if not key:
            raise ValueError("an idempotency key must not be empty")
        token = uuid.uuid4().hex
        digest = self.digest(key)
        now = utc_now()
        with write_transaction(self._engine) as connection:
            insert_if_missing(
                connection,
                journal_table,
                {
                    "scope": self.scope,
                    "key_sha256": digest,
                    "label": label or self.scope,
                    "state": JournalState.STARTED.value,
                    "claim": token,
                    "attempts": 1,
                    "created_at": now,
                    "updated_at": now,
                    "instance_sha256": instance,
                    "try_number": try_number,
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
                    try_number=try_number,
                )
            )
            return Claim("claimed", _entry(self._lock_row(connection, digest)))

    def complete(self, key: str, result: Any) -> JournalEntry:
        """Record the JSON ``result`` of claimed work; later :meth:`begin` calls replay it."""
        return self._finish(key, JournalState.COMPLETED, result=encode_result(result), error=None)

    def fail(self, key: str, error: str) -> JournalEntry:
        """Record that claimed work failed without effect; the next :meth:`begin` claims it again.

        Also the way to resolve an in-doubt entry by hand after checking that its effect did not happen.
        """
        return self._finish(key, JournalState.FAILED, result=None, error=error[:4000])

    def lookup(self, key: str) -> JournalEntry | None:
        """The entry for ``key``, or None if it was never claimed."""
        with read_transaction(self._engine) as connection:
            row = connection.execute(self._row(select(journal_table), self.digest(key))).mappings().first()
        return None if row is None else _entry(row)

    def _finish(
        self, key: str, state: JournalState, *, result: str | None, error: str | None
    ) -> JournalEntry:
        digest = self.digest(key)
        with write_transaction(self._engine) as connection:
            row = self._locked_row(connection, digest)
            if row is None or row["state"] != JournalState.STARTED.value:
                found = "no entry" if row is None else f"state {row['state']!r}"
                raise JournalConflict(
                    f"cannot mark {self.scope} journal key as {state.value}: expected state 'started', found "
                    f"{found} (key digest {digest[:16]})"
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


def encode_result(result: Any) -> str:
    """A step result as the journal stores it: canonical JSON, at most ``MAX_RESULT_BYTES``."""
    try:
        encoded = canonical_json(result)
    except (TypeError, ValueError) as error:
        raise ValueError(f"a journaled result must be JSON (no NaN/Infinity): {error}") from error
    if len(encoded.encode()) > MAX_RESULT_BYTES:
        raise ValueError(f"a journaled result must be at most {MAX_RESULT_BYTES} bytes as JSON")
    return encoded


def apply_steps(connection: Connection, steps: Iterable[JournalStep]) -> None:
    """Write claims, completions and failures in the caller's transaction (the group-commit writer's)."""
    claims: list[dict[str, Any]] = []
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    now = utc_now()
    for step in steps:
        if isinstance(step, StepClaim):
            claims.append(
                {
                    "scope": step.scope,
                    "key_sha256": step.key_sha256,
                    "label": step.label,
                    "state": JournalState.STARTED.value,
                    "claim": uuid.uuid4().hex,
                    "attempts": 1,
                    "created_at": now,
                    "updated_at": now,
                    "instance_sha256": step.instance_sha256,
                    "try_number": step.try_number,
                    "reservation_id": step.reservation_id,
                }
            )
        elif isinstance(step, StepDone):
            done.append(
                {
                    "scope": step.scope,
                    "key_sha256": step.key_sha256,
                    "label": step.label,
                    "state": JournalState.COMPLETED.value,
                    "claim": "done",
                    "attempts": 1,
                    "result": encode_result(step.result),
                    "created_at": now,
                    "updated_at": now,
                    "instance_sha256": step.instance_sha256,
                    "try_number": step.try_number,
                    "reservation_id": step.reservation_id,
                    "prompt_tokens": step.prompt_tokens,
                    "completion_tokens": step.completion_tokens,
                    "cost_usd": repr(float(step.cost_usd)),
                }
            )
        else:
            failed.append(
                {"b_scope": step.scope, "b_key": step.key_sha256, "b_error": step.error[:4000], "b_now": now}
            )
    upsert_claim, upsert_done = _upserts(dialect_name(connection))
    if claims:
        prepared_write(connection, upsert_claim, list(claims[0])).execute(connection, claims)
    if done:
        prepared_write(connection, upsert_done, list(done[0])).execute(connection, done)
    if failed:
        prepared_write(connection, _MARK_FAILED).execute(connection, failed)


_MARK_FAILED = (
    update(journal_table)
    .where(
        and_(journal_table.c.scope == bindparam("b_scope"), journal_table.c.key_sha256 == bindparam("b_key"))
    )
    .values(state=JournalState.FAILED.value, error=bindparam("b_error"), updated_at=bindparam("b_now"))
)


@functools.cache
def _upserts(dialect: str) -> tuple[Any, Any]:
    """The claim and completion upserts for ``dialect``, built once: building ``ON CONFLICT`` statements
    (their ``excluded`` alias) costs more than executing them in a group commit."""
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    table = journal_table
    claim = insert(table)
    claim = claim.on_conflict_do_update(
        index_elements=[table.c.scope, table.c.key_sha256],
        set_={
            "state": claim.excluded.state,
            "claim": claim.excluded.claim,
            "attempts": table.c.attempts + 1,
            "try_number": claim.excluded.try_number,
            "reservation_id": claim.excluded.reservation_id,
            "updated_at": claim.excluded.updated_at,
        },
        # A step completed meanwhile (elsewhere) keeps its result.
        where=table.c.state != JournalState.COMPLETED.value,
    )
    done = insert(table)
    done = done.on_conflict_do_update(
        index_elements=[table.c.scope, table.c.key_sha256],
        set_={
            name: getattr(done.excluded, name)
            for name in (
                "state",
                "claim",
                "result",
                "try_number",
                "reservation_id",
                "prompt_tokens",
                "completion_tokens",
                "cost_usd",
                "updated_at",
            )
        },
    )
    return claim, done


def journal_usage_by_reservation(
    connection: Connection, reservation_ids: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """``{reservation id: (tokens, cost in micro-dollars)}`` of the completed steps charged to each
    reservation, read in the caller's transaction (the ledger's, when it settles a dead try's holds)."""
    if not reservation_ids:
        return {}
    table = journal_table
    usage: dict[str, tuple[int, int]] = {}
    rows = connection.execute(
        select(
            table.c.reservation_id, table.c.prompt_tokens, table.c.completion_tokens, table.c.cost_usd
        ).where(
            table.c.reservation_id.in_(list(reservation_ids)), table.c.state == JournalState.COMPLETED.value
        )
    )
    for reservation_id, prompt, completion, cost in rows:
        tokens, micros = usage.get(reservation_id, (0, 0))
        cost_micros = int((Decimal(cost or "0") * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        usage[reservation_id] = (tokens + int(prompt or 0) + int(completion or 0), micros + cost_micros)
    return usage


def _entry(row: RowMapping) -> JournalEntry:
    return JournalEntry(
        scope=row["scope"],
        key_sha256=row["key_sha256"],
        label=row["label"],
        state=JournalState(row["state"]),
        attempts=int(row["attempts"]),
        result=None if row["result"] is None else json.loads(row["result"]),
        error=row["error"],
        try_number=row["try_number"],
        reservation_id=row["reservation_id"],
        prompt_tokens=int(row["prompt_tokens"] or 0),
        completion_tokens=int(row["completion_tokens"] or 0),
        cost_usd=float(row["cost_usd"] or 0.0),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
