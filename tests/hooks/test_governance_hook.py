"""GovernanceHook: where its settings come from, fail-closed defaults, task identity and hot reload.

Settings come from real Airflow config env vars and a real env-var connection; the policy file and the
SQLite store are real files under the test's tmp_path.
"""

from __future__ import annotations

import json

import pytest

from governed_ai.core.audit import AuditStore
from governed_ai.core.chat import ChatRequest
from governed_ai.core.errors import GovernanceDenied
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.hooks.governance import GovernanceHook
from tests.conftest import FakeDag, FakeTask, FakeTaskInstance, fake_context
from tests.fakes.openai_server import FakeOpenAIServer

CONN_ENV = "AIRFLOW_CONN_GOVERNED_AI_GOVERNANCE_DEFAULT"
LLM_CONN = "governed_ai_llm_default"
SUBJECT = Subject(dag_id="unit_dag", task_id="unit_task", run_id="manual__unit")


def granting(*models: str) -> str:
    grants = "\n".join(f"      - {{connection: {LLM_CONN}, model: {model}}}" for model in models)
    return f"version: 1\nrules:\n  - name: unit-rule\n    match: {{dag_id: unit_*}}\n    models:\n{grants}\n"


def allowed(hook: GovernanceHook, model: str) -> bool:
    return hook.get_conn().engine().authorize_model(SUBJECT, LLM_CONN, model).allowed


def set_connection(monkeypatch: pytest.MonkeyPatch, **extra: str) -> None:
    monkeypatch.setenv(CONN_ENV, json.dumps({"conn_type": "governed_ai_governance", "extra": extra}))


def test_settings_come_from_the_config_section(governance_policy, tmp_path):
    policy = governance_policy(granting("from-config"))

    hook = GovernanceHook()

    assert hook.settings.policy_path == str(policy)
    assert hook.settings.store_url == f"sqlite:///{tmp_path / 'governance.db'}"
    assert allowed(hook, "from-config")
    assert not allowed(hook, "other")


def test_policy_check_interval_comes_from_the_config_section(governance_policy, monkeypatch):
    governance_policy(granting("m"))
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__POLICY_CHECK_INTERVAL_SECONDS", "17.5")

    assert GovernanceHook().settings.policy_check_interval_seconds == 17.5


def test_connection_extras_override_the_config_section(governance_policy, monkeypatch, tmp_path):
    governance_policy(granting("from-config"))
    connection_policy = tmp_path / "connection_policy.yaml"
    connection_policy.write_text(granting("from-connection"))
    connection_store = f"sqlite:///{tmp_path / 'connection.db'}"
    set_connection(monkeypatch, policy_path=str(connection_policy), store_url=connection_store)

    hook = GovernanceHook()

    assert hook.settings.policy_path == str(connection_policy)
    assert hook.settings.store_url == connection_store
    assert allowed(hook, "from-connection")
    assert not allowed(hook, "from-config")


def test_connection_policy_yaml_is_used_when_no_policy_file_is_configured(governance_policy, monkeypatch):
    monkeypatch.delenv("AIRFLOW__GOVERNED_AI__POLICY_PATH")
    set_connection(monkeypatch, policy_yaml=granting("from-connection"))

    hook = GovernanceHook()

    assert allowed(hook, "from-connection")
    assert not allowed(hook, "other")
    assert hook.test_connection()[0] is True


def test_connection_policy_yaml_overrides_the_config_policy_path(governance_policy, monkeypatch):
    governance_policy(granting("from-config"))
    set_connection(monkeypatch, policy_yaml=granting("from-connection"))

    hook = GovernanceHook()

    assert allowed(hook, "from-connection")
    assert not allowed(hook, "from-config")


def test_no_policy_denies_everything_and_says_how_to_configure_it(monkeypatch, tmp_path):
    monkeypatch.delenv("AIRFLOW__GOVERNED_AI__POLICY_PATH")
    monkeypatch.delenv(CONN_ENV, raising=False)
    store_url = f"sqlite:///{tmp_path / 'governance.db'}"
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", store_url)
    hook = GovernanceHook()
    engine = hook.get_conn().engine()

    decisions = [
        engine.authorize_model(SUBJECT, LLM_CONN, "smollm2"),
        engine.authorize_tool(SUBJECT, "lookup_order", {}),
        engine.authorize_collection(SUBJECT, "kb_docs", "read"),
    ]

    for decision in decisions:
        assert not decision.allowed
        assert "AIRFLOW__GOVERNED_AI__POLICY_PATH" in decision.reason
        assert "governed_ai_governance_default" in decision.reason
    ok, message = hook.test_connection()
    assert not ok and "No governance policy is configured" in message

    with FakeOpenAIServer(models=("smollm2",)) as server:
        monkeypatch.setenv("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", server.connection_json())
        context = fake_context(SUBJECT.dag_id, SUBJECT.task_id)
        with pytest.raises(GovernanceDenied, match="policy_path"), hook.governed_client(context) as client:
            client.chat(ChatRequest(messages=[{"role": "user", "content": "hi"}], model="smollm2"))
        assert server.chat_requests == []  # a denied call never reaches the model
    (denial,) = AuditStore(create_store_engine(store_url)).query(action="model.authorize")
    assert denial.decision == "deny"


def test_subject_from_context_maps_the_task_identity():
    context = fake_context(
        "support_tickets", "classify", owner="support-ai", tags=("support", "eu"), run_id="r1"
    )

    subject = GovernanceHook.subject_from_context(context)  # type: ignore[arg-type]

    assert subject == Subject(
        dag_id="support_tickets",
        task_id="classify",
        run_id="r1",
        try_number=1,
        map_index=-1,
        owner="support-ai",
        tags=frozenset({"support", "eu"}),
    )


def test_subject_from_context_keeps_try_number_and_map_index():
    ti = FakeTaskInstance(dag_id="d", task_id="t", run_id="scheduled__x", try_number=3, map_index=4)
    context = {"ti": ti, "task": FakeTask(owner="team-a"), "dag": FakeDag(tags=("rag",))}

    subject = GovernanceHook.subject_from_context(context)  # type: ignore[arg-type]

    assert (subject.try_number, subject.map_index) == (3, 4)
    assert (subject.owner, subject.tags, subject.run_id) == ("team-a", frozenset({"rag"}), "scheduled__x")


def test_test_connection_reports_a_broken_policy(governance_policy):
    governance_policy("version: 1\nrules:\n  - name: r\n    modles: []\n")

    ok, message = GovernanceHook().test_connection()

    assert not ok
    assert "line 4" in message and "modles" in message


def test_test_connection_reports_a_loaded_policy(governance_policy):
    governance_policy(granting("m"))

    ok, message = GovernanceHook().test_connection()

    assert ok and "loaded" in message


def test_editing_the_policy_file_changes_decisions_without_a_new_hook(governance_policy, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__POLICY_CHECK_INTERVAL_SECONDS", "0")
    governance_policy(granting("alpha"))
    hook = GovernanceHook()
    assert allowed(hook, "alpha") and not allowed(hook, "beta-model")

    governance_policy(granting("beta-model"))  # different size, so the stat signature changes

    assert allowed(hook, "beta-model") and not allowed(hook, "alpha")

    governance_policy("version: 1\nrules: [")  # broken: fail closed, no fallback to the last good policy

    assert not allowed(hook, "beta-model")
    assert hook.test_connection()[0] is False


# -- which governance connection: the deployment's choice ---------------------------------------------------


def test_only_the_default_governance_connection_is_allowed_unless_the_deployment_lists_more(
    governance_policy, monkeypatch
):
    from governed_ai.core.errors import ConfigurationError

    governance_policy(granting("from-config"))
    assert GovernanceHook.allowed_conn_ids() == ("governed_ai_governance_default",)
    with pytest.raises(ConfigurationError) as refused:
        GovernanceHook(governance_conn_id="lax_governance")
    message = str(refused.value)
    for needed in (
        "governance_conn_id='lax_governance'",
        "[governed_ai] allowed_governance_conn_ids",
        "'governed_ai_governance_default'",
        "AIRFLOW__GOVERNED_AI__ALLOWED_GOVERNANCE_CONN_IDS",
    ):
        assert needed in message, needed
    assert refused.value.permanent

    # The deployment allows a second connection: a task may name it, and its policy applies.
    monkeypatch.setenv(
        "AIRFLOW__GOVERNED_AI__ALLOWED_GOVERNANCE_CONN_IDS", " governed_ai_governance_default, eu "
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_EU",
        json.dumps({"conn_type": "governed_ai_governance", "extra": {"policy_yaml": granting("eu-model")}}),
    )
    monkeypatch.delenv("AIRFLOW__GOVERNED_AI__POLICY_PATH")
    assert GovernanceHook.allowed_conn_ids() == ("governed_ai_governance_default", "eu")
    assert allowed(GovernanceHook(governance_conn_id="eu"), "eu-model")
    with pytest.raises(ConfigurationError, match="'governed_ai_governance_default', 'eu'"):
        GovernanceHook(governance_conn_id="lax_governance")

    # A deployment that allows only its own connection: tasks (and the CLI and UI) use that one.
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__ALLOWED_GOVERNANCE_CONN_IDS", "eu")
    assert GovernanceHook.for_deployment().governance_conn_id == "eu"
    with pytest.raises(ConfigurationError) as default_refused:
        GovernanceHook()
    assert "is 'eu'" in str(default_refused.value) and "omit governance_conn_id" not in str(
        default_refused.value
    )


def test_a_task_naming_a_governance_connection_the_deployment_does_not_allow_fails_before_any_call(
    governance_policy, monkeypatch
):
    from airflow.providers.common.compat.sdk import AirflowFailException

    from governed_ai.operators.batch import LLMBatchOperator
    from governed_ai.operators.llm import LLMOperator

    governance_policy(granting("fake-model"))
    # A laxer governance connection exists (it would grant everything), but the deployment did not allow it.
    lax = "version: 1\nrules:\n  - name: everything\n    models: [{connection: '*', model: '*'}]\n"
    monkeypatch.setenv(
        "AIRFLOW_CONN_LAX", json.dumps({"conn_type": "governed_ai_governance", "extra": {"policy_yaml": lax}})
    )
    with FakeOpenAIServer() as server:
        monkeypatch.setenv("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", server.connection_json())
        operators = [
            LLMOperator(task_id="ask", prompt="hi", model="fake-model", governance_conn_id="lax"),
            LLMBatchOperator(
                task_id="batch",
                items=["a", "b"],
                prompt_template="{{ item }}",
                model="fake-model",
                governance_conn_id="lax",
            ),
        ]
        for operator in operators:
            with pytest.raises(AirflowFailException, match="allowed_governance_conn_ids") as failed:
                operator.execute(fake_context())
            assert "governance_conn_id='lax'" in str(failed.value)
        assert server.requests == []
