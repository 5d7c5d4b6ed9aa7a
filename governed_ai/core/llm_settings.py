"""Typed settings of an OpenAI-compatible LLM connection, parsed from an Airflow connection's fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from governed_ai.core.errors import ConfigurationError
from governed_ai.core.pricing import PriceTable

StructuredOutputMode = Literal["json_schema", "json_object"]


class ConnectionConfigError(ConfigurationError):
    """A connection's fields are wrong; the message names the connection, the field and the fix."""


class LLMConnectionSettings(BaseModel):
    """Everything the LLM hook needs from its connection.

    ``structured_output`` chooses how a JSON schema is sent: ``json_schema`` is OpenAI's
    ``response_format``; ``json_object`` sends ``{"type": "json_object", "schema": ...}``, which servers
    such as llama-cpp-python accept (and enforce with a grammar) while they reject ``json_schema``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    base_url: str | None = None
    api_key: str | None = None
    default_model: str | None = None
    organization: str | None = None
    project: str | None = None
    timeout: PositiveFloat = 60.0
    max_retries: int = Field(default=3, ge=0, le=20)
    deadline_seconds: PositiveFloat | None = None
    structured_output: StructuredOutputMode = "json_schema"
    prices: PriceTable = Field(default_factory=PriceTable)
    tokenizer: str | None = None

    @field_validator("prices", mode="before")
    @classmethod
    def _prices_from_mapping(cls, value: Any) -> Any:
        if value is None or value == "":
            return PriceTable()
        if isinstance(value, Mapping) and "prices" not in value:
            return PriceTable.from_mapping(value)
        return value

    @field_validator(
        "base_url", "api_key", "default_model", "organization", "project", "tokenizer", mode="before"
    )
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def from_fields(cls, conn_id: str, fields: Mapping[str, Any]) -> LLMConnectionSettings:
        """Validate raw connection fields, turning pydantic's errors into one actionable message."""
        return settings_from_fields(cls, "LLM", conn_id, fields)


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def settings_from_fields(
    model: type[SettingsT], kind: str, conn_id: str, fields: Mapping[str, Any]
) -> SettingsT:
    """``model`` validated from a connection's fields; errors name the connection, each field and the fix."""
    try:
        return model.model_validate(dict(fields))
    except ValidationError as err:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in e['loc'])}': {e['msg']} (got {e.get('input')!r})"
            if e["loc"]
            else str(e["msg"])  # a check across fields
            for e in err.errors()
        )
        raise ConnectionConfigError(
            f"{kind} connection '{conn_id}' is misconfigured: {problems}. "
            "Fix the connection (Admin -> Connections, or the AIRFLOW_CONN_ variable)."
        ) from None
