"""Real Chroma both ways (embedded PersistentClient and a ``chroma run`` server) with offline embeddings."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from governed_ai.core.retrieval.chroma_store import ChromaStore
from governed_ai.core.retrieval.embeddings import OfflineMiniLMEmbedding

try:
    from tests.chroma_server import ChromaServer, start_chroma_server
except ImportError:  # pytest's rootdir-relative import puts tests/ itself on sys.path
    from chroma_server import ChromaServer, start_chroma_server  # type: ignore[no-redef]


@pytest.fixture(scope="session")
def offline_embedding() -> OfflineMiniLMEmbedding:
    return OfflineMiniLMEmbedding()


@pytest.fixture(scope="session")
def chroma_server() -> Iterator[ChromaServer]:
    server = start_chroma_server()
    try:
        yield server
    finally:
        server.stop()


def _settings():  # type: ignore[no-untyped-def]
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False)


@pytest.fixture(params=["embedded", "server"])
def chroma_client(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real chromadb client: embedded in a fresh directory, or talking to the session's Chroma server."""
    import chromadb

    if request.param == "embedded":
        return chromadb.PersistentClient(path=str(tmp_path / "chroma"), settings=_settings())
    server: ChromaServer = request.getfixturevalue("chroma_server")
    return chromadb.HttpClient(host=server.host, port=server.port, settings=_settings())


@pytest.fixture
def store(chroma_client, offline_embedding: OfflineMiniLMEmbedding) -> ChromaStore:  # type: ignore[no-untyped-def]
    return ChromaStore(chroma_client, offline_embedding)


@pytest.fixture
def collection_name() -> str:
    """Unique per test (the server is shared by the session); ``kb_`` so the example policy's grants apply."""
    return f"kb_{uuid.uuid4().hex[:12]}"
