"""Fixtures for the core store tests: a fresh SQLite file or a fresh PostgreSQL database, in turn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from governed_ai.core.sqlstore import create_store_engine


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite file that does not exist yet (tables get created on first use)."""
    return f"sqlite:///{tmp_path / 'governance.db'}"


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
