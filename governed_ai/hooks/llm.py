"""Hook for any OpenAI-compatible endpoint: OpenAI itself, vLLM, llama.cpp, Ollama, LiteLLM."""

from __future__ import annotations

import asyncio
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseHook
from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_2_PLUS

from governed_ai.core.errors import ConfigurationError
from governed_ai.core.llm_settings import LLMConnectionSettings
from governed_ai.core.transport import ModelTransport
from governed_ai.hooks.connection_fields import extra_fields
from governed_ai.hooks.connection_forms import legacy_field_behaviour, legacy_form_widgets

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from governed_ai.core.client import GovernedClient
    from governed_ai.core.openai_gateway import AsyncOpenAI, OpenAI


class LLMHook(BaseHook):
    """Owns an OpenAI-compatible connection: its settings and the transport that talks to it.

    Connection fields: *Host* is the base URL (``https://api.openai.com/v1``, ``http://127.0.0.1:8080/v1``),
    *Password* the API key. Extra fields: ``default_model``, ``organization``, ``project``, ``timeout``
    (seconds per request), ``max_retries`` (retries on 408/409/429/5xx, timeouts, dropped connections and
    malformed bodies, honouring ``Retry-After``), ``deadline_seconds`` (one request's limit over all its
    retries), ``structured_output`` (``json_schema`` or ``json_object``) and ``prices``
    (``{"model-or-glob": {"input_per_1m_tokens": 0.15, "output_per_1m_tokens": 0.6}}``).

    Calls are never made through this hook directly: they go through the governed client
    (:meth:`governed_ai.hooks.governance.GovernanceHook.governed_client`), which applies the policy,
    budgets, redaction, the replay journal and the audit trail. :meth:`get_conn` and :meth:`governed_client`
    hand out that client for the running task, through the governance connection ``governance_conn_id``,
    which the deployment must allow like any operator's (``[governed_ai] allowed_governance_conn_ids``).

    :param llm_conn_id: Airflow connection id of type ``governed_ai_llm``.
    :param governance_conn_id: The governance connection of the client :meth:`get_conn` gives (default
        ``governed_ai_governance_default``); one the deployment allows.
    """

    conn_name_attr = "llm_conn_id"
    default_conn_name = "governed_ai_llm_default"
    conn_type = "governed_ai_llm"
    hook_name = "Governed AI: LLM (OpenAI-compatible)"

    if not AIRFLOW_V_3_2_PLUS:  # Airflow 3.1 reads the connection form from the hook: connection_forms.py
        get_connection_form_widgets = staticmethod(legacy_form_widgets(conn_type))
        get_ui_field_behaviour = staticmethod(legacy_field_behaviour(conn_type))

    def __init__(
        self, llm_conn_id: str = default_conn_name, governance_conn_id: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if governance_conn_id is not None:
            from governed_ai.hooks.governance import check_governance_conn_allowed

            check_governance_conn_allowed(governance_conn_id)  # the same deployment allow-list as operators'
        self.llm_conn_id = llm_conn_id
        self.governance_conn_id = governance_conn_id

    @cached_property
    def settings(self) -> LLMConnectionSettings:
        conn = self.get_connection(self.llm_conn_id)
        fields = extra_fields(conn, self.conn_type)
        fields["base_url"] = conn.host or fields.get("base_url")
        fields["api_key"] = conn.password or fields.get("api_key")
        return LLMConnectionSettings.from_fields(self.llm_conn_id, fields)

    def transport(
        self,
        *,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_retries: int | None = None,
    ) -> ModelTransport:
        """A new transport to this endpoint (one per event loop), with optional client-side rate limits;
        ``max_retries`` overrides the connection's for this task."""
        settings = self.settings
        if max_retries is not None:
            settings = settings.model_copy(update={"max_retries": max_retries})
        return ModelTransport(
            settings,
            connection_id=self.llm_conn_id,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )

    def governed_client(self, context: Context | None = None, **settings: Any) -> GovernedClient:
        """The governed client of the running task (or of ``context``) on this connection: the policy,
        budgets, redaction, journal and audit trail of ``governance_conn_id`` apply to every call. Use it as
        a context manager; ``settings`` are those of ``GovernanceHook.governed_client``."""
        from governed_ai.hooks.governance import GovernanceHook

        if context is None:
            from airflow.providers.common.compat.sdk import get_current_context

            try:
                context = get_current_context()
            except Exception:
                raise ConfigurationError(
                    f"LLMHook({self.llm_conn_id!r}) gives governed clients to running tasks only: call "
                    "get_conn() or governed_client() inside a task, or pass the task's context."
                ) from None
        governance = GovernanceHook(
            governance_conn_id=self.governance_conn_id or GovernanceHook.default_conn_name
        )
        return governance.governed_client(context, llm_conn_id=self.llm_conn_id, **settings)

    def openai_client(self, context: Context | None = None, **settings: Any) -> OpenAI:
        """An ``openai.OpenAI`` whose every request is a governed call of the running task (or of
        ``context``) on this connection, through ``governance_conn_id`` (see
        ``GovernanceHook.openai_client``). Use it as a context manager."""
        from governed_ai.core.openai_gateway import governed_openai_client

        return governed_openai_client(self.governed_client(context, **settings))

    def async_openai_client(self, context: Context | None = None, **settings: Any) -> AsyncOpenAI:
        """The ``openai.AsyncOpenAI`` counterpart of :meth:`openai_client`."""
        from governed_ai.core.openai_gateway import governed_async_openai_client

        return governed_async_openai_client(self.governed_client(context, **settings))

    def get_conn(self) -> GovernedClient:
        """The governed client of the running task (see :meth:`governed_client`): the hook never hands out
        an ungoverned path to the model."""
        return self.governed_client()

    def list_models(self) -> list[str]:
        """Model ids the endpoint serves; free (no tokens), so it doubles as the connection test."""

        async def listed() -> list[str]:
            transport = self.transport()
            try:
                return await transport.list_models()
            finally:
                await transport.aclose()

        return asyncio.run(listed())

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
