"""The governance hook: where an Airflow task meets the policy, the budget ledger and the audit trail."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowNotFoundException, BaseHook
from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_2_PLUS
from pydantic import BaseModel, ConfigDict

from governed_ai.core.approval import RESUMED_AFTER_APPROVAL
from governed_ai.core.audit import ANCHOR_EVERY_RECORDS, ANCHOR_EVERY_SECONDS, AuditStore
from governed_ai.core.audit_anchors import AnchorLog
from governed_ai.core.budget import DEFAULT_WAIT_SECONDS
from governed_ai.core.client import GovernedClient
from governed_ai.core.errors import ConfigurationError
from governed_ai.core.governor import EngineSource, FixedPolicy, Governor
from governed_ai.core.keys import DeploymentKey, load_or_create_key_file, read_key_file
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.paths import default_store_url, provider_home
from governed_ai.core.policy import PolicyEngine, PolicyProvider
from governed_ai.core.policy import RedactionSettings as PolicyRedaction
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.hooks.airflow_sdk import airflow_sdk
from governed_ai.hooks.connection_fields import extra_fields
from governed_ai.hooks.connection_forms import legacy_field_behaviour, legacy_form_widgets
from governed_ai.hooks.llm import LLMHook
from governed_ai.hooks.observers import default_observers

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Connection, Context

    from governed_ai.core.openai_gateway import AsyncOpenAI, OpenAI

CONFIG_SECTION = "governed_ai"
#: The deployment's list of governance connections a task may name (comma-separated).
ALLOWED_CONN_IDS_OPTION = "allowed_governance_conn_ids"
JOURNAL_DIGEST_PURPOSE = "journal-and-item-keys"
NO_POLICY = (
    "No governance policy is configured, so every AI call is denied (fail-closed). Set [governed_ai] "
    "policy_path (env AIRFLOW__GOVERNED_AI__POLICY_PATH) to a policy YAML file, or create the "
    "'governed_ai_governance_default' connection with a policy_path or policy_yaml extra."
)

_TASK_LOG = logging.getLogger("airflow.task.governed_ai.audit")

#: Connection extra that may hold the audit key (the connection's password field is the other place).
AUDIT_KEY_EXTRA = "audit_key"
#: The single-machine fallback key file, under ``$AIRFLOW_HOME/governed_ai/``.
DEV_KEY_FILE = "audit.key"

# One Governor per (policy, store) per process: the policy's hot-reload state and the database engine
# are shared by every task a worker runs, instead of being rebuilt for each call.
_GOVERNORS: dict[tuple[str, ...], Governor] = {}
_GOVERNORS_LOCK = threading.Lock()
_POLICY_SOURCES: dict[tuple[str, ...], EngineSource] = {}


class GovernanceSettings(BaseModel):
    """Where the policy and the governance store are. Connection extras win over the config section."""

    model_config = ConfigDict(frozen=True)

    policy_path: str | None = None
    policy_yaml: str | None = None
    store_url: str | None = None
    policy_check_interval_seconds: float = 5.0
    audit_anchor_path: str | None = None
    audit_anchor_every_records: int = ANCHOR_EVERY_RECORDS
    audit_anchor_every_seconds: float = ANCHOR_EVERY_SECONDS


class GovernanceHook(BaseHook):
    """Authorizes, budgets, redacts and audits every governed call of a task.

    Settings come from the ``governed_ai_governance`` connection (extras ``policy_path``,
    ``policy_yaml``, ``store_url``, ``audit_anchor_path``) when it exists, else from the ``[governed_ai]``
    config section (``policy_path``, ``store_url``, ``policy_check_interval_seconds``,
    ``audit_anchor_path``, ``audit_anchor_every_records``, ``audit_anchor_every_seconds``). With no policy at
    all, every call is denied. The store defaults to a SQLite file under ``$AIRFLOW_HOME/governed_ai/``; set
    a PostgreSQL URL when several workers share it.

    The audit chain's key (:meth:`audit_key`) never comes from the governance database: the connection's
    password or ``audit_key`` extra, else ``[governed_ai] audit_hmac_key`` (which Airflow also reads from
    ``audit_hmac_key_cmd``, ``audit_hmac_key_secret`` and secrets backends), else, on a single machine, a
    key file created on first use. Anchors of the chain head go to ``audit_anchor_path`` (a local
    directory or an object-storage URL), by default ``$AIRFLOW_HOME/governed_ai/anchors/``.

    Which governance connection a task uses is the deployment's choice, not the DAG's: ``governance_conn_id``
    must be one of ``[governed_ai] allowed_governance_conn_ids`` (default: only
    ``governed_ai_governance_default``), else the hook refuses to be built (:class:`ConfigurationError`), so
    the task fails before any call. A DAG cannot pick a laxer policy or another store by naming a
    connection.

    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional); one the deployment
        allows in ``[governed_ai] allowed_governance_conn_ids``.
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
        check_governance_conn_allowed(governance_conn_id)
        self.governance_conn_id = governance_conn_id

    @classmethod
    def allowed_conn_ids(cls) -> tuple[str, ...]:
        """The governance connections the deployment lets tasks use: ``[governed_ai]
        allowed_governance_conn_ids`` (comma-separated), by default only :attr:`default_conn_name`."""
        from airflow.providers.common.compat.sdk import conf

        configured = conf.get(CONFIG_SECTION, ALLOWED_CONN_IDS_OPTION, fallback=None) or ""
        allowed = tuple(dict.fromkeys(part.strip() for part in configured.split(",") if part.strip()))
        return allowed or (cls.default_conn_name,)

    @classmethod
    def for_deployment(cls) -> GovernanceHook:
        """The hook of the deployment's own governance connection (the first it allows), for tools that
        are not a task: the CLI and the UI's API."""
        return cls(governance_conn_id=cls.allowed_conn_ids()[0])

    def _connection(self) -> Connection | None:
        try:
            return self.get_connection(self.governance_conn_id)
        except AirflowNotFoundException:
            return None

    @cached_property
    def settings(self) -> GovernanceSettings:
        from airflow.providers.common.compat.sdk import conf

        fields: dict[str, Any] = {
            "policy_path": conf.get(CONFIG_SECTION, "policy_path", fallback=None),
            "store_url": conf.get(CONFIG_SECTION, "store_url", fallback=None),
            "policy_check_interval_seconds": conf.getfloat(
                CONFIG_SECTION, "policy_check_interval_seconds", fallback=5.0
            ),
            "audit_anchor_path": conf.get(CONFIG_SECTION, "audit_anchor_path", fallback=None),
            "audit_anchor_every_records": conf.getint(
                CONFIG_SECTION, "audit_anchor_every_records", fallback=ANCHOR_EVERY_RECORDS
            ),
            "audit_anchor_every_seconds": conf.getfloat(
                CONFIG_SECTION, "audit_anchor_every_seconds", fallback=ANCHOR_EVERY_SECONDS
            ),
        }
        connection = self._connection()
        extra = extra_fields(connection, self.conn_type) if connection is not None else {}
        # The key is a secret: it is read by audit_key(), never kept in the (loggable) settings.
        extra.pop(AUDIT_KEY_EXTRA, None)
        from_connection = {key: value for key, value in extra.items() if value not in (None, "")}
        if "policy_yaml" in from_connection and "policy_path" not in from_connection:
            # An inline policy in the connection replaces the configured file, it does not merge with it.
            fields.pop("policy_path", None)
        fields.update(from_connection)
        return GovernanceSettings.model_validate({k: v for k, v in fields.items() if v not in (None, "")})

    def audit_key(self, *, create_dev_key: bool = True) -> DeploymentKey | None:
        """The deployment key of the audit chain, from the first place that has one: the governance
        connection (password, or the ``audit_key`` extra), ``[governed_ai] audit_hmac_key`` (and its
        ``_cmd``/``_secret`` forms and secrets backends, through Airflow's config), the key file
        ``$AIRFLOW_HOME/governed_ai/audit.key``. With ``create_dev_key`` the key file is created when
        nothing else is configured (a warning says that several workers need a shared key instead);
        otherwise None is returned, and verification reports that it cannot verify."""
        from airflow.providers.common.compat.sdk import conf

        connection = self._connection()
        if connection is not None:
            extra = extra_fields(connection, self.conn_type)
            for source, value in (
                (
                    f"connection {self.governance_conn_id} ({AUDIT_KEY_EXTRA} extra)",
                    extra.get(AUDIT_KEY_EXTRA),
                ),
                (f"connection {self.governance_conn_id} (password)", connection.password),
            ):
                if isinstance(value, str) and value.strip():
                    return DeploymentKey.from_text(value, source=source)
        configured = conf.get(CONFIG_SECTION, "audit_hmac_key", fallback=None)
        if configured and configured.strip():
            return DeploymentKey.from_text(configured, source=f"[{CONFIG_SECTION}] audit_hmac_key")
        path = provider_home() / DEV_KEY_FILE
        return load_or_create_key_file(path) if create_dev_key else read_key_file(path)

    def anchor_log(self) -> AnchorLog:
        """Where the audit chain head is anchored: ``audit_anchor_path`` (a local directory, or an
        object-storage URL read through Airflow's ``ObjectStoragePath``), by default
        ``$AIRFLOW_HOME/governed_ai/anchors/``."""
        location = self.settings.audit_anchor_path
        if not location:
            return AnchorLog(provider_home() / "anchors")
        if "://" in location and not location.startswith("file://"):
            from airflow.providers.common.compat.sdk import ObjectStoragePath

            return AnchorLog(ObjectStoragePath(location))
        return AnchorLog(location.removeprefix("file://"))

    @cached_property
    def governor(self) -> Governor:
        s = self.settings
        store_url = s.store_url or default_store_url()
        audit_key = self.audit_key()
        anchors = self.anchor_log()
        key = (
            s.policy_path or "",
            s.policy_yaml or "",
            store_url,
            audit_key.key_id if audit_key is not None else "",
            anchors.location,
        )
        with _GOVERNORS_LOCK:
            if key not in _GOVERNORS:
                policy = self._policy_source()
                engine = create_store_engine(store_url)
                _GOVERNORS[key] = Governor(
                    policy=policy,
                    ledger=BudgetLedger(engine),
                    audit=AuditStore(
                        engine,
                        observers=default_observers(),
                        key=audit_key,
                        anchors=anchors,
                        anchor_every_records=s.audit_anchor_every_records,
                        anchor_every_seconds=s.audit_anchor_every_seconds,
                    ),
                    mask=_airflow_mask,
                    on_secret_found=register_secret_with_airflow,
                )
                if audit_key is not None:
                    # Journal keys and item digests keyed too: not even a digest of an e-mail address
                    # used as an item key can be looked up by guessing.
                    _GOVERNORS[key].digest = audit_key.hasher(JOURNAL_DIGEST_PURPOSE).digest_text
            return _GOVERNORS[key]

    def _policy_source(self) -> EngineSource:
        s = self.settings
        if s.policy_path:
            return PolicyProvider(s.policy_path, check_interval_seconds=s.policy_check_interval_seconds)
        if s.policy_yaml:
            return PolicyProvider(text=s.policy_yaml, source=f"connection {self.governance_conn_id}")
        return FixedPolicy(PolicyEngine.deny_all(NO_POLICY, source="<no policy configured>"))

    def policy_engine(self) -> PolicyEngine:
        """The policy as it is now, without opening the governance store (parse-time checks). The source
        is kept per process, so its hot-reload check, not a fresh load, runs for each task parsed."""
        s = self.settings
        key = (s.policy_path or "", s.policy_yaml or "", self.governance_conn_id)
        with _GOVERNORS_LOCK:
            source = _POLICY_SOURCES.get(key)
            if source is None:
                source = _POLICY_SOURCES[key] = self._policy_source()
        return source.engine()

    def get_conn(self) -> Governor:
        return self.governor

    def governed_client(
        self,
        context: Context,
        *,
        llm_conn_id: str = LLMHook.default_conn_name,
        budget_block_size: int = 1,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_retries: int | None = None,
        deadline_seconds: float | None = None,
        budget_wait_seconds: float = DEFAULT_WAIT_SECONDS,
        on_wait: Callable[[str], None] | None = None,
    ) -> GovernedClient:
        """The governed client for the running task and an LLM connection: the one way to call a model.

        Use it as a context manager (``with hook.governed_client(context) as client: ...``): closing it
        settles the task's budget blocks and flushes its journal and audit writes. A try that resumes after
        an approval (:mod:`governed_ai.operators.approval` marks its context) replays what it completed
        before it waited.
        """
        llm = LLMHook(llm_conn_id=llm_conn_id)
        settings = llm.settings
        return GovernedClient(
            self.governor,
            llm.transport(
                requests_per_minute=requests_per_minute,
                tokens_per_minute=tokens_per_minute,
                max_retries=max_retries,
            ),
            self.subject_from_context(context),
            connection_id=llm_conn_id,
            prices=settings.prices,
            structured_output=settings.structured_output,
            default_model=settings.default_model,
            budget_block_size=budget_block_size,
            deadline_seconds=deadline_seconds if deadline_seconds is not None else settings.deadline_seconds,
            budget_wait_seconds=budget_wait_seconds,
            on_wait=on_wait if on_wait is not None else self.log.info,
            tokenizer=settings.tokenizer,
            replay_current_try=bool(context.get(RESUMED_AFTER_APPROVAL)),
        )

    def openai_client(
        self, context: Context, *, llm_conn_id: str = LLMHook.default_conn_name, **settings: Any
    ) -> OpenAI:
        """An ``openai.OpenAI`` for ``@task`` code whose every request is a governed call of the running
        task through ``llm_conn_id``: the policy, budgets, redaction, the replay journal and the audit trail
        apply as to the provider's operators (see :mod:`governed_ai.core.openai_gateway` for what it accepts
        and refuses). ``settings`` are those of :meth:`governed_client`. Use it as a context manager
        (``with hook.openai_client(context) as client: ...``); one left open is closed when the task ends.
        """
        from governed_ai.core.openai_gateway import governed_openai_client

        return governed_openai_client(self.governed_client(context, llm_conn_id=llm_conn_id, **settings))

    def async_openai_client(
        self, context: Context, *, llm_conn_id: str = LLMHook.default_conn_name, **settings: Any
    ) -> AsyncOpenAI:
        """The ``openai.AsyncOpenAI`` counterpart of :meth:`openai_client` (``async with``)."""
        from governed_ai.core.openai_gateway import governed_async_openai_client

        client = self.governed_client(context, llm_conn_id=llm_conn_id, **settings)
        return governed_async_openai_client(client)

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
            bundle=bundle_of(ti),
        )

    def test_connection(self) -> tuple[bool, str]:
        engine = self.governor.engine()
        if engine.load_error:
            return False, f"Policy does not load (every call is denied): {engine.load_error}"
        return True, f"Policy {engine.source} loaded (digest {engine.digest[:12]})."


def check_governance_conn_allowed(governance_conn_id: str) -> None:
    """Refuse a governance connection the deployment has not allowed (see :class:`GovernanceHook`)."""
    allowed = GovernanceHook.allowed_conn_ids()
    if governance_conn_id in allowed:
        return
    default = GovernanceHook.default_conn_name
    use = "name one of those" + (
        f" (or omit governance_conn_id: the default is {default!r})" if default in allowed else ""
    )
    raise ConfigurationError(
        f"governance_conn_id={governance_conn_id!r} is not a governance connection this deployment allows: "
        f"[{CONFIG_SECTION}] {ALLOWED_CONN_IDS_OPTION} is {', '.join(repr(a) for a in allowed)}. The "
        "governance connection decides the policy, the store and the audit key, so the deployment chooses "
        f"it, not the DAG. In the DAG, {use}; or have the deployment add {governance_conn_id!r} to "
        f"[{CONFIG_SECTION}] {ALLOWED_CONN_IDS_OPTION} (env AIRFLOW__GOVERNED_AI__"
        f"{ALLOWED_CONN_IDS_OPTION.upper()}, comma-separated)."
    )


def governance_conn_for_task(task: Any) -> str:
    """The governance connection to scan a task's rendered fields with: the task's own if the deployment
    allows it, else the deployment's first allowed one (the task will fail on the refused one anyway, but
    its rendered fields are masked first)."""
    wanted = getattr(task, "governance_conn_id", None) or GovernanceHook.default_conn_name
    allowed = GovernanceHook.allowed_conn_ids()
    return wanted if wanted in allowed else allowed[0]


def bundle_of(ti: Any) -> str | None:
    """The name of the DAG bundle the running task instance's DAG was loaded from, or None.

    A worker gets it from the workload the scheduler sent (``ti.bundle_instance``); under ``dag.test()``
    that is not set, and the DAG's record on the API server (``ti.get_dag``: the bundle the DAG processor
    parsed it from) says. Both come from the deployment's bundle configuration, not from DAG code.
    """
    bundle = getattr(ti, "bundle_instance", None)
    name = getattr(bundle, "name", None)
    if isinstance(name, str) and name:
        return name
    get_dag = getattr(ti, "get_dag", None)
    if get_dag is None:
        return None
    try:
        name = get_dag(ti.dag_id).bundle_name
    except Exception:  # not in a task process (unit tests with a fake task instance), or an older Airflow
        return None
    return name if isinstance(name, str) and name else None


def anchor_audit_chains() -> int:
    """Anchor the head of every audit chain this process appended to since its last anchor; returns how
    many anchors were written. Called when a task instance ends (see :mod:`governed_ai.plugins.listener`),
    so each task's records are covered by an anchor outside the database and a line in its log."""
    with _GOVERNORS_LOCK:
        governors = list(_GOVERNORS.values())
    written = 0
    for governor in governors:
        anchor = governor.audit.anchor(only_if_behind=True)
        if anchor is None:
            continue
        written += 1
        location = (
            governor.audit.anchors.describe(governor.audit.chain_id or "") if governor.audit.anchors else ""
        )
        # Under airflow.task, so the line lands in the task log: a copy of the head outside the database.
        _TASK_LOG.info(
            "audit chain anchored: seq %d head %s at %s (%s)",
            anchor.seq, anchor.hash, anchor.time.isoformat(), location,
        )  # fmt: skip
    return written


def register_secret_with_airflow(value: str) -> None:
    """Tell Airflow's secrets masker about a secret the redactor found, so the task log and the rendered
    template fields show ``***`` instead (in this process and, inside a task, in its supervisor); and
    have Airflow store the task's rendered fields again when it ends, now masked, since they were first
    stored before the secret was known."""
    mask = _airflow_mask_secret()
    if mask is None:  # pragma: no cover - an Airflow without a masker API
        return
    mask(value)
    try:
        from airflow.providers.common.compat.sdk import get_current_context

        task: Any = get_current_context()["task"]
        task.overwrite_rtif_after_execution = True
    except Exception:  # not inside a running task (a test calling the governor directly, a CLI)
        pass


def _airflow_mask_secret() -> Callable[[str], None] | None:
    # Airflow 3.1-3.3 expose it as airflow.sdk.log.mask_secret; older task SDK layouts had it elsewhere.
    for module, name in (
        ("airflow.sdk.log", "mask_secret"),
        ("airflow.sdk.execution_time.secrets_masker", "mask_secret"),
    ):
        try:
            found: Callable[[str], None] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        return found
    return None


def register_secrets_in_rendered_fields(task_instance: Any) -> int:
    """Scan the rendered template fields of a governed operator that is about to run, register every
    secret the policy's redactor finds with Airflow's masker, and store the rendered fields again: masked,
    and redacted as the policy redacts prompts (personal data too).

    Airflow stores a task's rendered fields before ``execute`` runs, i.e. before governance sees them;
    this runs right after that (from the task-instance listener), so a secret typed into a prompt is masked
    in the UI's rendered view and in every later log line, and the rendered view shows what the model is
    sent rather than the customer's e-mail address. Returns how many secrets were found.
    """
    task = task_instance.task
    if not type(task).__module__.startswith("governed_ai."):
        return 0
    fields = {name: getattr(task, name, None) for name in getattr(task, "template_fields", ())}
    governor, redaction = _governance_of(task_instance)
    found: list[str] = []
    governor.redactor_for(redaction).redact_obj_detailed(fields, on_secret=found.append)
    for value in found:
        register_secret_with_airflow(value)
    if found:
        task.overwrite_rtif_after_execution = True
    store_redacted_rendered_fields(task_instance, always=bool(found))
    return len(found)


def store_redacted_rendered_fields(task_instance: Any, *, always: bool = False) -> bool:
    """Store a governed task's rendered fields as Airflow serializes them (secrets it knows masked), with
    what the policy redacts from prompts redacted too; only when that changes something (or ``always``).

    Called when the task starts and again when it ends (the task-instance listener): at the end, Airflow
    stores the fields again itself when a secret was found during the run
    (``overwrite_rtif_after_execution``), from the task's raw values, which would bring personal data back.
    Returns whether fields were sent.
    """
    task = task_instance.task
    if not type(task).__module__.startswith("governed_ai.") or not getattr(task, "template_fields", ()):
        return False
    # Internal task-runner API (3.1-3.3). If it moves, Airflow's own overwrite at the end of the task
    # (overwrite_rtif_after_execution) still masks the secrets, not the personal data.
    try:
        from airflow.sdk.execution_time.comms import SetRenderedFields
        from airflow.sdk.execution_time.task_runner import SUPERVISOR_COMMS, _serialize_rendered_fields
    except ImportError:
        return False
    fields = _serialize_rendered_fields(task)
    found = 0
    governor, redaction = _governance_of(task_instance)
    if redaction.prompts:
        fields, found = governor.redact_obj(fields, redaction)
    if not found and not always:
        return False
    try:
        SUPERVISOR_COMMS.send(SetRenderedFields(rendered_fields=fields))
    except Exception:
        logging.getLogger(__name__).debug("could not store the redacted rendered fields", exc_info=True)
        return False
    return True


def _governance_of(task_instance: Any) -> tuple[Governor, PolicyRedaction]:
    hook = GovernanceHook(governance_conn_id=governance_conn_for_task(task_instance.task))
    governor = hook.governor
    subject = hook.subject_from_context(task_instance.get_template_context())
    return governor, governor.engine().redaction_for(subject)


def _airflow_mask(text: str) -> str:
    """Airflow's own secrets masker: it knows the task's connection passwords and sensitive variables."""
    return str(airflow_sdk("redact")(text))
