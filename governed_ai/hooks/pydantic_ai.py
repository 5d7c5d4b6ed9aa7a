"""A connection type that makes the common-ai operators governed (their ``llm_conn_id``: a
``governed_ai_pydanticai`` connection).

apache-airflow-providers-common-ai's operators (``LLMOperator``, ``AgentOperator`` and the others built on
``PydanticAIHook``) find their hook through the connection's type (``PydanticAIHook.get_hook``), and accept
any registered subclass of ``PydanticAIHook``. :class:`GovernedPydanticAIHook` is one: its ``get_conn()``
returns a governed pydantic-ai model (:func:`governed_ai.integrations.pydantic_ai.governed_chat_model`)
for the running task, so every model request of such an operator goes through the policy, budgets,
redaction, the replay journal and the audit trail, with no change to the operator.

The connection (type ``governed_ai_pydanticai``) only points at what the deployment already configured:

- extra ``llm_conn_id``: the ``governed_ai_llm`` connection whose endpoint, key, prices and default model
  are used (default ``governed_ai_llm_default``); the policy's grants name that connection;
- extra ``governance_conn_id``: the governance connection (default ``governed_ai_governance_default``; it
  must be one the deployment allows in ``[governed_ai] allowed_governance_conn_ids``);
- extra ``model``: the model or policy route to ask for (default: the LLM connection's ``default_model``);
  the operator's ``model_id`` wins over it. pydantic-ai's ``openai:`` prefix is accepted and dropped.

``fallback_conn_ids`` are refused: a fallback chain could fail over to an ungoverned connection; fallbacks
are the policy's ``model_routes``. Importing this module needs the ``common-ai`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from governed_ai.core.errors import ConfigurationError
from governed_ai.core.extras import requires_extra

with requires_extra("common-ai"):
    from airflow.providers.common.ai.hooks.pydantic_ai import PydanticAIHook

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context
    from pydantic_ai.models import Model

#: Connection extras of ``governed_ai_pydanticai``.
LLM_CONN_EXTRA = "llm_conn_id"
GOVERNANCE_CONN_EXTRA = "governance_conn_id"
MODEL_EXTRA = "model"


class GovernedPydanticAIHook(PydanticAIHook):
    """``PydanticAIHook`` whose model is governed (see the module docstring).

    :param llm_conn_id: Connection of type ``governed_ai_pydanticai`` (the common-ai operators pass theirs).
    :param model_id: Model or policy route; wins over the connection's ``model`` extra.
    :param fallback_conn_ids: Refused when non-empty (use the policy's ``model_routes``).
    """

    conn_type = "governed_ai_pydanticai"
    default_conn_name = "governed_ai_pydanticai_default"
    hook_name = "Governed AI: pydantic-ai model (common-ai operators)"
    model_provider = None

    @staticmethod
    def get_ui_field_behaviour() -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "port", "login", "host", "password"],
            "relabeling": {},
            "placeholders": {
                "extra": '{"llm_conn_id": "governed_ai_llm_default", "model": "default"}',
            },
        }

    def _governed_targets(self) -> tuple[str, str, str | None]:
        from governed_ai.hooks.governance import GovernanceHook, check_governance_conn_allowed
        from governed_ai.hooks.llm import LLMHook

        _, extra = self._get_conn_and_extra()
        fallbacks = (
            self.fallback_conn_ids if self.fallback_conn_ids is not None else extra.get("fallback_conn_ids")
        )
        if fallbacks and any(str(item).strip() for item in fallbacks):
            raise ConfigurationError(
                f"fallback_conn_ids={fallbacks!r} on governed connection '{self.llm_conn_id}': a fallback "
                "chain "
                "could fail over to an ungoverned model. Remove it; fallbacks of a governed model are the "
                "policy's model_routes (e.g. default: {model: gpt-4o-mini, fallbacks: [gpt-4.1-mini]})."
            )
        llm_conn_id = str(extra.get(LLM_CONN_EXTRA) or LLMHook.default_conn_name)
        governance_conn_id = str(extra.get(GOVERNANCE_CONN_EXTRA) or GovernanceHook.default_conn_name)
        check_governance_conn_allowed(governance_conn_id)
        model = self.model_id or extra.get(MODEL_EXTRA) or None
        return llm_conn_id, governance_conn_id, model

    def governed_model(self, context: Context) -> Model:
        """The governed pydantic-ai model of the task ``context`` belongs to."""
        from governed_ai.hooks.governance import GovernanceHook
        from governed_ai.integrations.pydantic_ai import governed_chat_model

        llm_conn_id, governance_conn_id, model = self._governed_targets()
        client = GovernanceHook(governance_conn_id=governance_conn_id).governed_client(
            context, llm_conn_id=llm_conn_id
        )
        try:
            return governed_chat_model(client, model)
        except BaseException:
            client.close()
            raise

    def get_conn(self) -> Model:
        """The governed model of the running task (cached for this hook, as ``PydanticAIHook`` does)."""
        if self._model is None:
            from airflow.providers.common.compat.sdk import get_current_context

            try:
                context = get_current_context()
            except Exception:
                raise ConfigurationError(
                    f"connection '{self.llm_conn_id}' ({self.conn_type}) gives governed models to running "
                    "tasks only: its calls are authorized and audited as the task's. Use it from an operator "
                    "or a @task, or call governed_model(context)."
                ) from None
            self._model = self.governed_model(context)
        return self._model

    def test_connection(self) -> tuple[bool, str]:
        """Checks what the connection points at without a task (and without spending tokens)."""
        from governed_ai.hooks.llm import LLMHook

        try:
            llm_conn_id, governance_conn_id, _ = self._governed_targets()
        except Exception as error:
            return False, str(error)
        ok, message = LLMHook(llm_conn_id=llm_conn_id).test_connection()
        return ok, f"LLM connection '{llm_conn_id}' (governance '{governance_conn_id}'): {message}"
