"""Fixtures for the core store tests: a fresh SQLite file and a real, throwaway PostgreSQL server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from governed_ai.core.sqlstore import create_store_engine

try:  # repository root on sys.path (python -m pytest from the root, or tests/ is a package)
    from tests.pg_server import PgServer, PostgresUnavailable, start_postgres
except ImportError:  # pytest's rootdir-relative import puts tests/ itself on sys.path
    from pg_server import PgServer, PostgresUnavailable, start_postgres  # type: ignore[no-redef]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite file that does not exist yet (tables get created on first use)."""
    return f"sqlite:///{tmp_path / 'governance.db'}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """A PostgreSQL cluster started for this test session and stopped at its end."""
    try:
        server = start_postgres()
    except PostgresUnavailable as error:
        # Deliberately a failure, not a skip: the PostgreSQL code paths must not go silently untested.
        pytest.fail(f"cannot start PostgreSQL for the tests: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PgServer) -> str:
    """URL (psycopg 3 driver) of the session server's default database."""
    return postgres_server.url


@pytest.fixture
def fresh_postgres_url(postgres_server: PgServer) -> str:
    """URL of a new, empty database on the session server, so tests never see each other's rows."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty governance database on each backend in turn."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("fresh_postgres_url"))


@pytest.fixture
def store_engine(store_url: str) -> Iterator[Engine]:
    """An engine from :func:`create_store_engine` on the fresh database; disposed after the test."""
    engine = create_store_engine(store_url)
    try:
        yield engine
    finally:
        engine.dispose()
