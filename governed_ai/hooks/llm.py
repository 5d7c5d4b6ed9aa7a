"""Hook for any OpenAI-compatible chat endpoint: OpenAI itself, vLLM, llama.cpp, Ollama, LiteLLM."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import openai
from airflow.providers.common.compat.sdk import BaseHook
from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_2_PLUS
from pydantic import BaseModel

from governed_ai.core.chat import ChatRequest, ChatResult, Message, StructuredChat
from governed_ai.core.llm_settings import LLMConnectionSettings
from governed_ai.hooks.connection_fields import extra_fields
from governed_ai.hooks.connection_forms import legacy_field_behaviour, legacy_form_widgets

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

# Servers that do not check keys (local ones) still need a non-empty string for the SDK.
_NO_KEY = "no-key-configured"


class LLMCallError(RuntimeError):
    """The endpoint refused or failed a call; the message says what to check."""


class ModelNotServed(ValueError):
    """The endpoint does not list the requested model."""


class LLMHook(BaseHook):
    """Owns an OpenAI-compatible connection and its sync and async clients.

    Connection fields: *Host* is the base URL (``https://api.openai.com/v1``, ``http://127.0.0.1:8080/v1``),
    *Password* the API key. Extra fields: ``default_model``, ``organization``, ``project``, ``timeout``
    (seconds), ``max_retries``, ``structured_output`` (``json_schema`` or ``json_object``) and ``prices``
    (``{"model-or-glob": {"input_per_1m_tokens": 0.15, "output_per_1m_tokens": 0.6}}``).

    Retries on 408/409/429/5xx, connection errors and timeouts are the openai SDK's own: exponential
    backoff with jitter that honours ``Retry-After``, ``max_retries`` times.

    :param llm_conn_id: Airflow connection id of type ``governed_ai_llm``.
    """

    conn_name_attr = "llm_conn_id"
    default_conn_name = "governed_ai_llm_default"
    conn_type = "governed_ai_llm"
    hook_name = "Governed AI: LLM (OpenAI-compatible)"

    if not AIRFLOW_V_3_2_PLUS:  # Airflow 3.1 reads the connection form from the hook: connection_forms.py
        get_connection_form_widgets = staticmethod(legacy_form_widgets(conn_type))
        get_ui_field_behaviour = staticmethod(legacy_field_behaviour(conn_type))

    def __init__(self, llm_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm_conn_id = llm_conn_id

    @cached_property
    def settings(self) -> LLMConnectionSettings:
        conn = self.get_connection(self.llm_conn_id)
        fields = extra_fields(conn, self.conn_type)
        fields["base_url"] = conn.host or fields.get("base_url")
        fields["api_key"] = conn.password or fields.get("api_key")
        return LLMConnectionSettings.from_fields(self.llm_conn_id, fields)

    def _client_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return {
            "api_key": s.api_key or _NO_KEY,
            "base_url": s.base_url,
            "organization": s.organization,
            "project": s.project,
            "timeout": s.timeout,
            "max_retries": s.max_retries,
        }

    @cached_property
    def client(self) -> OpenAI:
        return openai.OpenAI(**self._client_kwargs())

    @cached_property
    def async_client(self) -> AsyncOpenAI:
        return openai.AsyncOpenAI(**self._client_kwargs())

    def new_async_client(self, *, max_retries: int | None = None) -> AsyncOpenAI:
        """A fresh async client (batch work retries per item itself, so it passes ``max_retries=0``)."""
        kwargs = self._client_kwargs()
        if max_retries is not None:
            kwargs["max_retries"] = max_retries
        return openai.AsyncOpenAI(**kwargs)

    def get_conn(self) -> OpenAI:
        return self.client

    def resolve_model(self, model: str | None) -> str:
        """The model to call: the one asked for, else the connection's ``default_model``."""
        chosen = model or self.settings.default_model
        if not chosen:
            raise ValueError(
                f"No model given: set the operator's 'model' parameter, or 'default_model' in the extra "
                f"fields of connection '{self.llm_conn_id}'."
            )
        return chosen

    def build_request(
        self,
        messages: Sequence[Message],
        *,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        output_schema: type[BaseModel] | None = None,
        max_repair_attempts: int = 2,
    ) -> ChatRequest:
        return ChatRequest(
            messages=list(messages),
            model=self.resolve_model(model),
            temperature=temperature,
            max_tokens=max_tokens,
            output_schema=output_schema,
            max_repair_attempts=max_repair_attempts,
            structured_output=self.settings.structured_output,
        )

    def chat(self, request: ChatRequest) -> ChatResult:
        """Run one call (plus repair attempts for structured output) and return text, usage and cost."""
        loop = StructuredChat(request, self.settings.prices)
        while (kwargs := loop.next_request()) is not None:
            started = time.perf_counter()
            try:
                completion = self.client.chat.completions.create(**kwargs)
            except openai.APIError as err:
                raise self._explain(err, request.model) from err
            loop.feed(completion, time.perf_counter() - started)
        return loop.result()

    async def achat(self, request: ChatRequest) -> ChatResult:
        """Async twin of :meth:`chat`, for batch work on one event loop."""
        loop = StructuredChat(request, self.settings.prices)
        while (kwargs := loop.next_request()) is not None:
            started = time.perf_counter()
            try:
                completion = await self.async_client.chat.completions.create(**kwargs)
            except openai.APIError as err:
                raise self._explain(err, request.model) from err
            loop.feed(completion, time.perf_counter() - started)
        return loop.result()

    def list_models(self) -> list[str]:
        """Model ids the endpoint serves; free (no tokens), so it doubles as the connection test."""
        return [m.id for m in self.client.models.list()]

    @cached_property
    def served_models(self) -> list[str] | None:
        """Models the endpoint lists, or None when it does not implement ``/models``."""
        try:
            return self.list_models()
        except openai.APIError as err:
            self.log.warning("Could not list models on connection '%s': %s", self.llm_conn_id, err)
            return None

    def ensure_model_served(self, model: str) -> None:
        """Fail before spending anything when the endpoint does not serve ``model``.

        Some servers (llama.cpp) silently answer with whatever model they have loaded; checking the
        list keeps a typo from turning into results from the wrong model.
        """
        served = self.served_models
        if served and model not in served:
            raise ModelNotServed(
                f"Model '{model}' is not served by connection '{self.llm_conn_id}' "
                f"({self.settings.base_url or 'default endpoint'}). Set the operator's 'model' parameter "
                f"(or the connection's default_model) to one of: {', '.join(sorted(served)[:30])}."
            )

    def test_connection(self) -> tuple[bool, str]:
        """Airflow's *Test* button: lists models instead of sending a prompt, so it spends no tokens."""
        try:
            models = self.list_models()
        except Exception as err:
            return (
                False,
                f"Could not list models at {self.settings.base_url or 'the default endpoint'}: {err}",
            )
        default = self.settings.default_model
        if default and models and default not in models:
            return False, f"Connected, but default_model '{default}' is not served; available: {models[:20]}"
        return True, f"Connected; {len(models)} model(s) available."

    def _explain(self, err: openai.APIError, model: str) -> Exception:
        where = f"connection '{self.llm_conn_id}' ({self.settings.base_url or 'default endpoint'})"
        if isinstance(err, openai.NotFoundError):
            return LLMCallError(
                f"The endpoint of {where} answered 404 for model '{model}': check the 'model' parameter "
                f"or the connection's default_model, and the base URL. Server said: {err.message}"
            )
        if isinstance(err, openai.AuthenticationError | openai.PermissionDeniedError):
            return LLMCallError(
                f"The endpoint of {where} refused the API key (HTTP {err.status_code}): set a valid key in "
                f"the connection's password field. Server said: {err.message}"
            )
        if isinstance(err, openai.BadRequestError):
            return LLMCallError(
                f"The endpoint of {where} rejected the request for model '{model}' (HTTP 400): "
                f"{err.message}. If it rejects response_format json_schema, set the connection's "
                "structured_output extra to 'json_object'."
            )
        return LLMCallError(f"Call to {where} failed after the SDK's retries: {err}")
