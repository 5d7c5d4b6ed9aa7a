"""Asking a model for JSON that fits a pydantic model, and explaining to it what went wrong when not."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ValidationError

from governed_ai.core.llm_settings import StructuredOutputMode


def ensure_schema_model(value: object, parameter: str = "output_schema") -> type[BaseModel] | None:
    """Return ``value`` if it is a pydantic model class (or None); otherwise say what was expected."""
    if value is None:
        return None
    if isinstance(value, type) and issubclass(value, BaseModel):
        return value
    kind = "an instance" if isinstance(value, BaseModel) else f"a {type(value).__name__}"
    raise TypeError(
        f"'{parameter}' must be a pydantic model class (a subclass of pydantic.BaseModel), got {kind}: "
        f"{value!r}. Pass the class itself, e.g. {parameter}=TicketClassification."
    )


@functools.lru_cache(maxsize=256)
def response_format(schema_model: type[BaseModel], mode: StructuredOutputMode) -> dict[str, Any]:
    """The ``response_format`` argument for the chosen server dialect (computed once per schema: callers
    must not modify the returned dict)."""
    schema = schema_model.model_json_schema()
    if mode == "json_object":
        return {"type": "json_object", "schema": schema}
    return {
        "type": "json_schema",
        "json_schema": {"name": schema_model.__name__[:64], "schema": schema, "strict": False},
    }


def parse_reply(content: str | None, schema_model: type[BaseModel]) -> BaseModel:
    """Validate a reply; raises ``ValidationError`` or ``ValueError`` with the reason."""
    if content is None or not content.strip():
        raise ValueError("the reply was empty")
    return schema_model.model_validate_json(_strip_code_fence(content))


def describe_failure(error: Exception) -> str:
    """A short, model- and human-readable list of what was wrong with a reply."""
    if isinstance(error, ValidationError):
        lines = []
        for item in error.errors(include_url=False):
            where = ".".join(str(p) for p in item["loc"]) or "(whole object)"
            lines.append(f"- {where}: {item['msg']}")
        return "\n".join(lines)
    return f"- {error}"


def repair_message(error: Exception, finish_reason: str | None) -> dict[str, str]:
    """The user turn that sends a failed reply's errors back to the model."""
    hint = ""
    if finish_reason == "length":
        hint = " Your reply was cut off by the token limit: keep string values short."
    return {
        "role": "user",
        "content": (
            "Your previous reply did not match the required JSON schema:\n"
            f"{describe_failure(error)}\n"
            f"Reply again with only the corrected JSON object.{hint}"
        ),
    }


def _strip_code_fence(content: str) -> str:
    # Chat models often wrap JSON in ```json fences even when told not to.
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        if text.rstrip().endswith("```"):
            text = text.rstrip()[:-3]
    return text.strip()
