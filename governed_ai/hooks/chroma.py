"""The Chroma hook: owns the Chroma client and the embedding function a connection describes."""

from __future__ import annotations

import threading
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowNotFoundException, BaseHook
from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_2_PLUS

from governed_ai.core.paths import provider_home
from governed_ai.core.retrieval.chroma_store import ChromaStore
from governed_ai.core.retrieval.embeddings import Embedder, OfflineMiniLMEmbedding
from governed_ai.core.retrieval.settings import ChromaSettings
from governed_ai.hooks.connection_fields import extra_fields
from governed_ai.hooks.connection_forms import legacy_field_behaviour, legacy_form_widgets

if TYPE_CHECKING:
    from chromadb.api import ClientAPI

# Embedded Chroma keeps one in-memory index per directory; every hook in a process must share the client
# (and the embedding model, ~25 MB, loaded once) instead of opening the files again.
_CLIENTS: dict[tuple[Any, ...], ClientAPI] = {}
_OFFLINE_EMBEDDING: OfflineMiniLMEmbedding | None = None
_LOCK = threading.Lock()


def default_chroma_path() -> Path:
    """Embedded Chroma's directory when the connection names none: ``$AIRFLOW_HOME/governed_ai/chroma``."""
    return provider_home() / "chroma"


def _offline_embedding() -> OfflineMiniLMEmbedding:
    global _OFFLINE_EMBEDDING
    with _LOCK:
        if _OFFLINE_EMBEDDING is None:
            _OFFLINE_EMBEDDING = OfflineMiniLMEmbedding()
        return _OFFLINE_EMBEDDING


class ChromaHook(BaseHook):
    """Chroma, embedded or as a server, with an embedding function chosen by the connection.

    Without the connection (or with no host) Chroma runs embedded in ``$AIRFLOW_HOME/governed_ai/chroma``
    (extra ``path`` to change it): fine for one machine, not for several workers. With ``host``/``port``
    (``ssl``, and the auth token in the password field) the hook talks to a ``chroma run`` server.
    Embeddings: ``embedding="offline"`` (default; all-MiniLM-L6-v2 in ONNX from PyPI, no network, no torch)
    or ``embedding="openai"`` with ``embedding_model`` through the LLM connection ``embedding_conn_id``;
    the operators send those requests through the governed client (grant, budget, redaction, audit).

    :param chroma_conn_id: Connection of type ``governed_ai_chroma`` (optional).
    """

    conn_name_attr = "chroma_conn_id"
    default_conn_name = "governed_ai_chroma_default"
    conn_type = "governed_ai_chroma"
    hook_name = "Governed AI: Chroma"

    if not AIRFLOW_V_3_2_PLUS:  # Airflow 3.1 reads the connection form from the hook: connection_forms.py
        get_connection_form_widgets = staticmethod(legacy_form_widgets(conn_type))
        get_ui_field_behaviour = staticmethod(legacy_field_behaviour(conn_type))

    def __init__(self, chroma_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chroma_conn_id = chroma_conn_id

    @cached_property
    def settings(self) -> ChromaSettings:
        try:
            conn = self.get_connection(self.chroma_conn_id)
        except AirflowNotFoundException:
            return ChromaSettings()
        fields: dict[str, Any] = dict(extra_fields(conn, self.conn_type))
        fields.update(host=conn.host, port=conn.port, token=conn.password)
        if conn.schema:
            fields.setdefault("database", conn.schema)
        return ChromaSettings.from_fields(self.chroma_conn_id, fields)

    def get_conn(self) -> ClientAPI:
        """The chromadb client (shared per process for the same location)."""
        import chromadb
        from chromadb.config import Settings

        s = self.settings
        if s.embedded:
            path = Path(s.path) if s.path else default_chroma_path()
            key: tuple[Any, ...] = ("embedded", str(path.resolve()), s.tenant, s.database)
        else:
            key = ("http", s.host, s.port, s.ssl, s.tenant, s.database, tuple(sorted(s.headers().items())))
        with _LOCK:
            if key not in _CLIENTS:
                # Built only for a new client: chromadb's Settings is a pydantic-settings model that
                # reads the environment, ~10 ms each time.
                chroma_settings = Settings(anonymized_telemetry=False)  # no phoning home from workers
                if s.embedded:
                    path.mkdir(parents=True, exist_ok=True)
                    _CLIENTS[key] = chromadb.PersistentClient(
                        path=str(path), settings=chroma_settings, tenant=s.tenant, database=s.database
                    )
                else:
                    _CLIENTS[key] = chromadb.HttpClient(
                        host=str(s.host),
                        port=s.port,
                        ssl=s.ssl,
                        headers=s.headers(),
                        settings=chroma_settings,
                        tenant=s.tenant,
                        database=s.database,
                    )
            return _CLIENTS[key]

    def store(self, embedder: Embedder | None) -> ChromaStore:
        """The collections of this connection with ``embedder`` (None: count, check and delete only)."""
        return ChromaStore(self.get_conn(), embedder)

    def offline_embedder(self) -> OfflineMiniLMEmbedding:
        """The in-process embedding model (shared by every hook of the process; loaded once)."""
        return _offline_embedding()

    def test_connection(self) -> tuple[bool, str]:
        try:
            client = self.get_conn()
            client.heartbeat()
            names = [c if isinstance(c, str) else c.name for c in client.list_collections()]
        except Exception as error:  # the Test button must report, not raise
            return False, f"Chroma is not reachable: {error}"
        where = "embedded" if self.settings.embedded else f"server {self.settings.host}:{self.settings.port}"
        return True, f"Chroma ({where}) answers; {len(names)} collection(s)."
