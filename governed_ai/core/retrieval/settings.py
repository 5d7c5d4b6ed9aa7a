"""Typed settings of a Chroma connection: embedded (a directory) or a Chroma server, plus the embedder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from governed_ai.core.llm_settings import settings_from_fields

EmbeddingKind = Literal["offline", "openai"]


class ChromaSettings(BaseModel):
    """Where Chroma is and how texts are embedded.

    No ``host`` means embedded Chroma (``PersistentClient``) in ``path``: right for one machine. With a
    ``host`` the hook talks to a Chroma server (``chroma run``), which is what several workers must share.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    host: str | None = None
    port: int = Field(default=8000, ge=1, le=65535)
    ssl: bool = False
    token: str | None = Field(default=None, repr=False)
    auth_header: Literal["Authorization", "X-Chroma-Token"] = "Authorization"
    path: str | None = None
    tenant: str = "default_tenant"
    database: str = "default_database"
    embedding: EmbeddingKind = "offline"
    embedding_model: str | None = None
    embedding_conn_id: str = "governed_ai_llm_default"

    @field_validator("host", "token", "path", "embedding_model", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("port", mode="before")
    @classmethod
    def _default_port(cls, value: Any) -> Any:
        return 8000 if value in (None, "") else value

    @model_validator(mode="after")
    def _openai_needs_model(self) -> ChromaSettings:
        if self.embedding == "openai" and not self.embedding_model:
            raise ValueError(
                "embedding 'openai' needs embedding_model (e.g. text-embedding-3-small), served by the "
                "LLM connection named in embedding_conn_id"
            )
        return self

    @property
    def embedded(self) -> bool:
        return self.host is None

    def headers(self) -> dict[str, str]:
        if not self.token:
            return {}
        if self.auth_header == "Authorization":
            return {"Authorization": f"Bearer {self.token}"}
        return {"X-Chroma-Token": self.token}

    @classmethod
    def from_fields(cls, conn_id: str, fields: Mapping[str, Any]) -> ChromaSettings:
        """Validate raw connection fields, turning pydantic's errors into one actionable message."""
        return settings_from_fields(cls, "Chroma", conn_id, fields)
