"""SQL storage shared by the governance tables: engine creation, write transactions, table creation.

The ledger and the audit trail both need "one writer at a time" semantics across processes. On SQLite
that means a write transaction started with ``BEGIN IMMEDIATE`` (the file lock is taken up front, so two
writers never deadlock upgrading a read lock); on PostgreSQL it means ordinary transactions plus row
locks taken by the caller. :func:`write_transaction` hides that difference.
"""

from __future__ import annotations

import functools
import operator
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import DateTime, Engine, Insert, MetaData, Table, create_engine, event, inspect, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.sql.expression import ClauseElement
from sqlalchemy.types import TypeDecorator

from governed_ai.core.extras import requires_extra

#: The one MetaData every governance table of the provider is declared on.
governance_metadata = MetaData()

#: Dialects the governance store is written and tested for.
SUPPORTED_DIALECTS = frozenset({"sqlite", "postgresql"})

# Connection-level execution option that asks the SQLite "begin" hook for BEGIN IMMEDIATE.
_IMMEDIATE_OPTION = "governed_ai_begin_immediate"

# Lock key for serialising CREATE TABLE across processes on PostgreSQL (concurrent CREATE TABLE IF NOT
# EXISTS can still fail on the pg_type unique index). Arbitrary but fixed: "gov-ai" in ASCII.
_PG_DDL_LOCK_KEY = 0x676F762D6169


class SqlStoreSettings(BaseModel):
    """How to open the governance database."""

    model_config = ConfigDict(frozen=True)

    url: str = Field(description="SQLAlchemy URL, e.g. sqlite:////var/lib/gov.db or postgresql+psycopg://...")
    busy_timeout_ms: int = Field(
        default=30_000, ge=0, description="SQLite: how long a writer waits for the lock"
    )
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        default="NORMAL",
        description="SQLite synchronous pragma: NORMAL (with WAL) survives process crashes, FULL power loss",
    )
    echo: bool = False


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no time zone type and would silently drop tzinfo; PostgreSQL returns values in the session
    time zone. Both are normalised to aware UTC so comparisons and hashes never depend on the backend.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        # SQLite stores text; a fixed naive-UTC form keeps lexical order equal to time order.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value)


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime; naive values are taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def utc_now() -> datetime:
    """Current time as an aware UTC datetime (the default clock of the ledger and audit trail)."""
    return datetime.now(UTC)


def create_store_engine(settings: SqlStoreSettings | str | URL, **engine_kwargs: Any) -> Engine:
    """Create an engine for the governance tables.

    SQLite connections get WAL journaling (readers never block the writer), a busy timeout (writers
    queue instead of failing with "database is locked") and SQLAlchemy-controlled BEGIN so that
    :func:`write_transaction` can issue ``BEGIN IMMEDIATE``.
    """
    if isinstance(settings, URL):
        settings = SqlStoreSettings(url=settings.render_as_string(hide_password=False))
    elif isinstance(settings, str):
        settings = SqlStoreSettings(url=settings)
    url = make_url(settings.url)
    dialect = url.get_backend_name()
    if dialect not in SUPPORTED_DIALECTS:
        raise ValueError(
            f"unsupported database {dialect!r} for the governance store; "
            f"use one of {sorted(SUPPORTED_DIALECTS)}"
        )
    if dialect != "sqlite":
        with requires_extra("postgres"):  # the extra brings the driver (psycopg)
            return create_engine(url, echo=settings.echo, **engine_kwargs)
    engine = create_engine(url, echo=settings.echo, **engine_kwargs)
    _install_sqlite_hooks(engine, settings)
    return engine


def _install_sqlite_hooks(engine: Engine, settings: SqlStoreSettings) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (it only begins before DML, never before SELECT/DDL),
        # so the "begin" hook below decides exactly what kind of transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching to WAL may itself have to wait for another process.
            cursor.execute(f"PRAGMA busy_timeout = {int(settings.busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {settings.sqlite_synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_IMMEDIATE_OPTION)
        # Straight to the driver: every transaction starts here, and going through SQLAlchemy's execution
        # of a fixed statement costs several times the BEGIN itself.
        driver: Any = connection.connection.dbapi_connection
        driver.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")


def dialect_name(engine_or_connection: Engine | Connection) -> str:
    """The backend name ("sqlite", "postgresql") of an engine or connection."""
    return engine_or_connection.dialect.name


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that is the only writer of the database while it runs (SQLite) or that is ready
    for ``SELECT ... FOR UPDATE`` row locks (PostgreSQL). Commits on success, rolls back on error."""
    with write_connection(engine) as connection, connection.begin():
        yield connection


def write_connection(engine: Engine) -> Connection:
    """A connection whose every ``begin()`` starts a transaction as :func:`write_transaction` does; for a
    writer that keeps one connection for many transactions."""
    connection = engine.connect()
    if dialect_name(engine) == "sqlite":
        connection = connection.execution_options(**{_IMMEDIATE_OPTION: True})
    return connection


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A plain (deferred) transaction for consistent reads; never takes the SQLite write lock."""
    with engine.connect() as connection, connection.begin():
        yield connection


# Which tables were already created through which engine, so "create on first use" costs one
# round of checks per engine and process instead of one per call.
_created_tables: weakref.WeakKeyDictionary[Engine, set[str]] = weakref.WeakKeyDictionary()
_created_tables_lock = threading.Lock()


def ensure_tables(engine: Engine, tables: Sequence[Table]) -> None:
    """Create ``tables`` (and their indexes) if they do not exist yet; safe with concurrent processes."""
    names = {table.name for table in tables}
    with _created_tables_lock:
        done = _created_tables.setdefault(engine, set())
        if names <= done:
            return
    with write_transaction(engine) as connection:
        if dialect_name(connection) == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_DDL_LOCK_KEY})
        governance_metadata.create_all(connection, tables=list(tables), checkfirst=True)
        for table in tables:
            _add_missing_columns(connection, table)
    with _created_tables_lock:
        _created_tables.setdefault(engine, set()).update(names)


def _add_missing_columns(connection: Connection, table: Table) -> None:
    """Bring a table created by an older version up to date: add its new (nullable) columns and indexes.

    Columns are only ever added by the provider, never renamed or dropped, so this is the whole migration.
    """
    inspector = inspect(connection)
    existing = {column["name"] for column in inspector.get_columns(table.name)}
    for column in table.columns:
        if column.name in existing:
            continue
        if not column.nullable:  # pragma: no cover - a programming error, caught by the tests
            raise RuntimeError(f"new column {table.name}.{column.name} must be nullable to be added")
        kind = column.type.compile(dialect=connection.dialect)
        connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
    indexes = {index["name"] for index in inspector.get_indexes(table.name)}
    for index in table.indexes:
        if index.name not in indexes:
            index.create(connection, checkfirst=True)


def insert_if_missing(connection: Connection, table: Table, values: dict[str, Any]) -> None:
    """INSERT a row unless one with the same primary key exists (no error, no overwrite).

    Used to create per-key rows that are then locked with ``SELECT ... FOR UPDATE``: two processes may
    race to create the same row and both must go on to lock it.
    """
    statement: Insert
    if dialect_name(connection) == "postgresql":
        statement = postgresql_insert(table).values(**values).on_conflict_do_nothing()
    else:
        statement = sqlite_insert(table).values(**values).on_conflict_do_nothing()
    connection.execute(statement)


class PreparedWrite:
    """A write statement compiled once for one dialect and set of columns, run with the driver's own
    ``executemany`` inside the caller's transaction.

    The group-commit writer runs the same three or four statements for every group, thousands of times a
    minute; SQLAlchemy's per-execution work (cache key, parameter and result set-up, events) cost far more
    than SQLite's own. The values still go through SQLAlchemy's bind processing for the dialect (so a
    datetime is stored exactly as any other write stores it); only the per-execution machinery is skipped.
    Get one with :func:`prepared_write`.
    """

    def __init__(self, statement: ClauseElement, dialect: Dialect, keys: tuple[str, ...] | None) -> None:
        columns = list(keys) if keys is not None else None
        compiled: Any = statement.compile(dialect=dialect, column_keys=columns)
        self.sql: str = compiled.string
        order: list[str] | None = compiled.positiontup
        self._processors: list[tuple[str, Any]] = list(compiled._bind_processors.items())
        # A positional driver (sqlite3) takes a tuple in the statement's order, built by one C call.
        self._positional: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None
        if order:
            getter = operator.itemgetter(*order)
            self._positional = getter if len(order) > 1 else (lambda params: (getter(params),))
        # Values the statement holds itself (a WHERE id = 1); the others each row must give.
        base = compiled.construct_params(_check=False)
        self._needed = frozenset(name for name, bind in compiled.binds.items() if bind.required) & set(base)
        self._fixed = {name: value for name, value in base.items() if name not in self._needed}

    def parameters(self, values: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        if not self._needed <= values.keys():
            missing = sorted(self._needed - values.keys())
            raise ValueError(f"no value for {missing} in a prepared write: {self.sql[:80]}")
        params = {**self._fixed, **values} if self._fixed or self._processors else values
        for name, process in self._processors:
            params[name] = process(params[name])
        if self._positional is not None:
            return self._positional(params)
        return params

    def execute(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Run the statement once per row of ``rows`` (one ``executemany``)."""
        if not rows:
            return
        cursor = connection.connection.cursor()
        try:
            parameters: Any = [self.parameters(row) for row in rows]
            cursor.executemany(self.sql, parameters)
        finally:
            cursor.close()

    def first(self, connection: Connection, values: dict[str, Any] | None = None) -> Any:
        """Run a query once and return its first row (a tuple), or None."""
        cursor = connection.connection.cursor()
        try:
            cursor.execute(self.sql, self.parameters(values or {}))
            return cursor.fetchone()
        finally:
            cursor.close()


@functools.lru_cache(maxsize=64)
def _prepared(statement: ClauseElement, dialect: Dialect, keys: tuple[str, ...] | None) -> PreparedWrite:
    return PreparedWrite(statement, dialect, keys)


def prepared_write(
    connection: Connection, statement: ClauseElement, keys: Sequence[str] | None = None
) -> PreparedWrite:
    """``statement`` (a module-level constant: it is cached by identity) prepared for ``connection``'s
    dialect, with the columns ``keys`` for an INSERT."""
    return _prepared(statement, connection.dialect, tuple(keys) if keys is not None else None)
