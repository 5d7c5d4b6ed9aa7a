"""ChromaHook: connection settings, embedded and server clients, embedding choice, Test button."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from governed_ai.core.llm_settings import ConnectionConfigError
from governed_ai.core.retrieval import SourceDocument, chunk_records
from governed_ai.core.retrieval.embeddings import GovernedEmbedder, OfflineMiniLMEmbedding
from governed_ai.core.retrieval.settings import ChromaSettings
from governed_ai.hooks.chroma import ChromaHook, default_chroma_path
from tests.chroma_server import ChromaServer, start_chroma_server
from tests.fakes.openai_server import FakeOpenAIServer

ENV = "AIRFLOW_CONN_GOVERNED_AI_CHROMA_DEFAULT"


@pytest.fixture(scope="module")
def server():
    running: ChromaServer = start_chroma_server()
    yield running
    running.stop()


def set_conn(monkeypatch: pytest.MonkeyPatch, **conn) -> None:
    monkeypatch.setenv(ENV, json.dumps({"conn_type": "governed_ai_chroma", **conn}))


def test_without_a_connection_chroma_is_embedded_under_airflow_home(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    hook = ChromaHook()
    assert hook.settings.embedded
    assert isinstance(hook.offline_embedder(), OfflineMiniLMEmbedding)
    assert default_chroma_path().is_relative_to(Path(__import__("os").environ["AIRFLOW_HOME"]))
    ok, message = hook.test_connection()
    assert ok and "embedded" in message


def test_embedded_path_from_the_connection(monkeypatch, tmp_path):
    set_conn(monkeypatch, extra={"path": str(tmp_path / "kb")})
    hook = ChromaHook()
    hook.store(hook.offline_embedder()).upsert(
        "kb_hook", chunk_records([SourceDocument("hello world", "a")], ingested_at=1)
    )
    assert (tmp_path / "kb" / "chroma.sqlite3").exists()
    assert ChromaHook().get_conn() is hook.get_conn()  # one client per directory and process


def test_server_connection_talks_to_chroma_run(monkeypatch, server):
    set_conn(monkeypatch, host=server.host, port=server.port)
    hook = ChromaHook()
    assert not hook.settings.embedded
    hook.store(hook.offline_embedder()).upsert(
        "kb_server_hook", chunk_records([SourceDocument("refunds take 14 days", "r")], ingested_at=1)
    )
    ok, message = hook.test_connection()
    assert ok and f"server {server.host}:{server.port}" in message
    import chromadb

    direct = chromadb.HttpClient(host=server.host, port=server.port)
    assert direct.get_collection("kb_server_hook").count() == 1


def test_unreachable_server_is_reported_by_the_test_button(monkeypatch):
    from tests.chroma_server import free_port

    set_conn(monkeypatch, host="127.0.0.1", port=free_port())
    ok, message = ChromaHook().test_connection()
    assert not ok and "not reachable" in message


def test_token_goes_in_the_chosen_header():
    assert ChromaSettings(host="h", token="s3cret").headers() == {"Authorization": "Bearer s3cret"}
    assert ChromaSettings(host="h", token="s3cret", auth_header="X-Chroma-Token").headers() == {
        "X-Chroma-Token": "s3cret"
    }
    assert "s3cret" not in repr(ChromaSettings(host="h", token="s3cret"))


def test_misconfigured_connection_names_the_field(monkeypatch):
    set_conn(monkeypatch, extra={"embedding": "openai"})
    with pytest.raises(ConnectionConfigError, match="embedding_model"):
        ChromaHook().settings  # noqa: B018
    set_conn(monkeypatch, host="h", port=99999)
    with pytest.raises(ConnectionConfigError, match="'port'"):
        ChromaHook().settings  # noqa: B018


EMBED_POLICY = """
version: 1
rules:
  - name: embed
    match: {dag_id: "*"}
    models: [{connection: embedder, model: fake-embed}]
"""


def test_openai_embeddings_go_through_the_governed_client(monkeypatch, tmp_path, client_for_connection):
    with FakeOpenAIServer() as llm:
        monkeypatch.setenv("AIRFLOW_CONN_EMBEDDER", llm.connection_json())
        set_conn(
            monkeypatch,
            extra={
                "path": str(tmp_path / "c"),
                "embedding": "openai",
                "embedding_model": "fake-embed",
                "embedding_conn_id": "embedder",
            },
        )
        hook = ChromaHook()
        assert (hook.settings.embedding, hook.settings.embedding_conn_id) == ("openai", "embedder")
        client = client_for_connection(EMBED_POLICY, conn_id="embedder")
        store = hook.store(GovernedEmbedder(client, str(hook.settings.embedding_model)))
        store.upsert("kb_remote", chunk_records([SourceDocument("x y z", "s")], ingested_at=1))
        assert "/v1/embeddings" in llm.paths
        assert store.client.get_collection("kb_remote").metadata["governed_ai_embedding_model"] == (
            "openai:fake-embed"
        )
        (call,) = client.governor.audit.query(action="embedding.call")
        assert (call.decision, call.rule, call.model) == ("allow", "embed", "fake-embed")
