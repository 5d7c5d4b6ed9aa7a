"""The governance hook: where an Airflow task meets the policy, the budget ledger and the audit trail."""

from __future__ import annotations

import threading
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowNotFoundException, BaseHook
from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_2_PLUS
from pydantic import BaseModel, ConfigDict

from governed_ai.core.audit import AuditStore
from governed_ai.core.governor import EngineSource, FixedPolicy, Governor
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.paths import default_store_url
from governed_ai.core.policy import PolicyEngine, PolicyProvider
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.hooks.connection_fields import extra_fields
from governed_ai.hooks.connection_forms import legacy_field_behaviour, legacy_form_widgets
from governed_ai.hooks.observers import default_observers

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

CONFIG_SECTION = "governed_ai"
NO_POLICY = (
    "No governance policy is configured, so every AI call is denied (fail-closed). Set [governed_ai] "
    "policy_path (env AIRFLOW__GOVERNED_AI__POLICY_PATH) to a policy YAML file, or create the "
    "'governed_ai_governance_default' connection with a policy_path or policy_yaml extra."
)

# One Governor per (policy, store) per process: the policy's hot-reload state and the database engine
# are shared by every task a worker runs, instead of being rebuilt for each call.
_GOVERNORS: dict[tuple[str, str, str], Governor] = {}
_GOVERNORS_LOCK = threading.Lock()


class GovernanceSettings(BaseModel):
    """Where the policy and the governance store are. Connection extras win over the config section."""

    model_config = ConfigDict(frozen=True)

    policy_path: str | None = None
    policy_yaml: str | None = None
    store_url: str | None = None
    policy_check_interval_seconds: float = 5.0


class GovernanceHook(BaseHook):
    """Authorizes, budgets, redacts and audits every governed call of a task.

    Settings come from the ``governed_ai_governance`` connection (extras ``policy_path``,
    ``policy_yaml``, ``store_url``) when it exists, else from the ``[governed_ai]`` config section
    (``policy_path``, ``store_url``, ``policy_check_interval_seconds``). With no policy at all, every call
    is denied. The store defaults to a SQLite file under ``$AIRFLOW_HOME/governed_ai/``; set a PostgreSQL
    URL when several workers share it.

    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional).
    """

    conn_name_attr = "governance_conn_id"
    default_conn_name = "governed_ai_governance_default"
    conn_type = "governed_ai_governance"
    hook_name = "Governed AI: Governance"

    if not AIRFLOW_V_3_2_PLUS:  # Airflow 3.1 reads the connection form from the hook: connection_forms.py
        get_connection_form_widgets = staticmethod(legacy_form_widgets(conn_type))
        get_ui_field_behaviour = staticmethod(legacy_field_behaviour(conn_type))

    def __init__(self, governance_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.governance_conn_id = governance_conn_id

    @cached_property
    def settings(self) -> GovernanceSettings:
        from airflow.providers.common.compat.sdk import conf

        fields: dict[str, Any] = {
            "policy_path": conf.get(CONFIG_SECTION, "policy_path", fallback=None),
            "store_url": conf.get(CONFIG_SECTION, "store_url", fallback=None),
            "policy_check_interval_seconds": conf.getfloat(
                CONFIG_SECTION, "policy_check_interval_seconds", fallback=5.0
            ),
        }
        try:
            extra = extra_fields(self.get_connection(self.governance_conn_id), self.conn_type)
        except AirflowNotFoundException:
            extra = {}
        from_connection = {key: value for key, value in extra.items() if value not in (None, "")}
        if "policy_yaml" in from_connection and "policy_path" not in from_connection:
            # An inline policy in the connection replaces the configured file, it does not merge with it.
            fields.pop("policy_path", None)
        fields.update(from_connection)
        return GovernanceSettings.model_validate({k: v for k, v in fields.items() if v not in (None, "")})

    @cached_property
    def governor(self) -> Governor:
        s = self.settings
        store_url = s.store_url or default_store_url()
        key = (s.policy_path or "", s.policy_yaml or "", store_url)
        with _GOVERNORS_LOCK:
            if key not in _GOVERNORS:
                policy: EngineSource
                if s.policy_path:
                    policy = PolicyProvider(
                        s.policy_path, check_interval_seconds=s.policy_check_interval_seconds
                    )
                elif s.policy_yaml:
                    policy = PolicyProvider(
                        text=s.policy_yaml, source=f"connection {self.governance_conn_id}"
                    )
                else:
                    policy = FixedPolicy(PolicyEngine.deny_all(NO_POLICY, source="<no policy configured>"))
                engine = create_store_engine(store_url)
                _GOVERNORS[key] = Governor(
                    policy=policy,
                    ledger=BudgetLedger(engine),
                    audit=AuditStore(engine, observers=default_observers()),
                    mask=_airflow_mask,
                )
            return _GOVERNORS[key]

    def get_conn(self) -> Governor:
        return self.governor

    @staticmethod
    def subject_from_context(context: Context) -> Subject:
        """The policy subject of the running task instance."""
        ti = context["ti"]
        task = context.get("task") or getattr(ti, "task", None)
        dag = context.get("dag") or getattr(task, "dag", None)
        owner = str(getattr(task, "owner", "airflow") or "airflow")
        map_index = getattr(ti, "map_index", None)
        return Subject(
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=str(ti.run_id),
            try_number=int(getattr(ti, "try_number", 1) or 1),
            map_index=-1 if map_index is None else int(map_index),
            owner=owner,
            tags=frozenset(getattr(dag, "tags", None) or ()),
        )

    def test_connection(self) -> tuple[bool, str]:
        engine = self.governor.engine()
        if engine.load_error:
            return False, f"Policy does not load (every call is denied): {engine.load_error}"
        return True, f"Policy {engine.source} loaded (digest {engine.digest[:12]})."


def _airflow_mask(text: str) -> str:
    """Airflow's own secrets masker: it knows the task's connection passwords and sensitive variables."""
    from airflow.providers.common.compat.sdk import redact

    return str(redact(text))
