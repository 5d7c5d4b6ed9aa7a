"""A pydantic-ai model whose every request is a governed call: any pydantic-ai ``Agent`` can run governed.

The model is pydantic-ai's own ``OpenAIChatModel`` over an ``OpenAIProvider`` whose ``openai.AsyncOpenAI``
is the governed one (:func:`governed_ai.core.openai_gateway.governed_async_openai_client`): pydantic-ai
builds the chat completion bodies (instructions, message history, tool definitions and tool results,
structured output) and the governed client authorizes, routes, redacts, replays from the journal,
budgets and audits each one, as it does for the provider's own operators. Tool calls work as with any
OpenAI-compatible model; streaming (``run_stream``, ``event_stream_handler``) does not (the gateway
refuses it with an HTTP 400 that pydantic-ai raises as ``ModelHTTPError``).

Airflow-free; pydantic-ai is imported only when a model is built (extra ``common-ai``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from governed_ai.core.client import GovernedClient
from governed_ai.core.errors import ConfigurationError
from governed_ai.core.extras import requires_extra
from governed_ai.core.openai_gateway import governed_async_openai_client

if TYPE_CHECKING:
    from pydantic_ai.models.openai import OpenAIChatModel

#: pydantic-ai's provider prefix for OpenAI-compatible models, accepted (and dropped) in model names.
OPENAI_PREFIX = "openai:"


def governed_model_name(client: GovernedClient, model: str | None) -> str:
    """The model (or policy route) a governed pydantic-ai model asks for: ``model`` without pydantic-ai's
    ``openai:`` prefix, else the LLM connection's ``default_model``. Another provider prefix is refused:
    the governed path speaks the OpenAI API to the LLM connection's endpoint only."""
    if model:
        name = model.removeprefix(OPENAI_PREFIX)
        prefix, sep, _ = name.partition(":")
        if sep and prefix.isidentifier() and prefix.islower() and "." not in prefix and "/" not in prefix:
            raise ConfigurationError(
                f"model {model!r} names the pydantic-ai provider {prefix!r}; a governed model talks to the "
                f"OpenAI-compatible endpoint of LLM connection '{client.connection_id}' only. Name the model "
                "(or policy route) as that endpoint knows it, e.g. 'gpt-4o-mini' or 'default'."
            )
        return name
    return client.resolve_requested(None)


def governed_chat_model(client: GovernedClient, model: str | None = None) -> OpenAIChatModel:
    """A pydantic-ai model for ``Agent(governed_chat_model(client, "default"), ...)``: every request goes
    through ``client`` (one task's governed client). The model owns the client: closing the model's
    OpenAI client (``model.client.close()``) closes it, and inside Airflow it is closed when the task ends.
    """
    name = governed_model_name(client, model)
    with requires_extra("common-ai"):
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(name, provider=OpenAIProvider(openai_client=governed_async_openai_client(client)))
