"""Test session setup: a private Airflow home and database, the real local model on demand.

Airflow reads its configuration at import time, so the environment is set before anything imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# The compatibility suite runs from the built wheel in its own venvs (scripts/compat.sh), not here.
collect_ignore = ["compat"]
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="governed-ai-tests-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "example_dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ.pop("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", None)
os.environ["AIRFLOW__GOVERNED_AI__POLICY_PATH"] = str(
    REPO / "example_dags" / "policies" / "governance_policy.yaml"
)
os.environ.pop("AIRFLOW__GOVERNED_AI__STORE_URL", None)


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[Path]:
    """A fresh Airflow metadata database (SQLite) for tests that run DAGs with ``dag.test()``."""
    from airflow.utils import db

    db.resetdb()
    yield _AIRFLOW_HOME


@pytest.fixture(scope="session")
def local_model() -> Iterator[str]:
    """The real local model (llama-cpp-python serving SmolLM2-135M) on a free port; yields its base URL."""
    from governed_ai import local_model as lm

    state_dir = _AIRFLOW_HOME / "local_model"
    state = lm.start(state_dir)
    try:
        yield state.base_url
    finally:
        lm.stop(state_dir)


@pytest.fixture
def local_model_connection(local_model: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Points the default LLM connection at the real local model for one test."""
    from governed_ai.local_model import CONNECTION_ENV, connection_json

    monkeypatch.setenv(CONNECTION_ENV, connection_json(local_model))
    return local_model


@dataclass(frozen=True)
class FakeTaskInstance:
    """Stands in for Airflow's RuntimeTaskInstance in unit tests that call ``execute`` directly."""

    dag_id: str = "unit_dag"
    task_id: str = "unit_task"
    run_id: str = "manual__unit"
    try_number: int = 1
    map_index: int = -1


@dataclass(frozen=True)
class FakeDag:
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class FakeTask:
    owner: str = "airflow"


def fake_context(dag_id: str = "unit_dag", task_id: str = "unit_task", *, owner: str = "airflow",
                 tags: tuple[str, ...] = (), run_id: str = "manual__unit") -> dict[str, Any]:  # fmt: skip
    """A minimal task context (named fake) carrying the identity governance needs."""
    return {
        "ti": FakeTaskInstance(dag_id=dag_id, task_id=task_id, run_id=run_id),
        "task": FakeTask(owner=owner),
        "dag": FakeDag(tags=tags),
    }


@pytest.fixture
def governance_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Points governance at a policy written by the test and a fresh SQLite store; returns the writer."""
    policy = tmp_path / "policy.yaml"
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__POLICY_PATH", str(policy))
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", f"sqlite:///{tmp_path / 'governance.db'}")

    def write(text: str) -> Path:
        policy.write_text(text)
        return policy

    return write


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture
def client_for_connection(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Builds a real GovernedClient for an LLM connection (as the environment defines it), with a policy
    given as YAML and a private SQLite store; closed at the end of the test."""
    from governed_ai.core.client import GovernedClient
    from governed_ai.core.governor import Governor
    from governed_ai.core.ledger import BudgetLedger
    from governed_ai.core.policy import PolicyProvider
    from governed_ai.core.sqlstore import create_store_engine
    from governed_ai.core.subject import Subject
    from governed_ai.hooks.llm import LLMHook
    from tests.audit_support import keyed_audit_store

    engine = create_store_engine(f"sqlite:///{tmp_path / 'client-governance.db'}")
    clients: list[GovernedClient] = []

    def build(policy_yaml: str, *, conn_id: str = "governed_ai_llm_default", dag_id: str = "unit_dag",
              task_id: str = "unit_task", try_number: int = 1) -> GovernedClient:  # fmt: skip
        hook = LLMHook(llm_conn_id=conn_id)
        governor = Governor(
            policy=PolicyProvider(text=policy_yaml),
            ledger=BudgetLedger(engine),
            audit=keyed_audit_store(engine),
        )
        client = GovernedClient(
            governor,
            hook.transport(),
            Subject(dag_id=dag_id, task_id=task_id, try_number=try_number),
            connection_id=conn_id,
            prices=hook.settings.prices,
            structured_output=hook.settings.structured_output,
            default_model=hook.settings.default_model,
        )
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A PostgreSQL cluster started for this test session and stopped at its end."""
    from tests.pg_server import PostgresUnavailable, start_postgres

    try:
        server = start_postgres()
    except PostgresUnavailable as error:
        # Deliberately a failure, not a skip: the PostgreSQL code paths must not go silently untested.
        pytest.fail(f"cannot start PostgreSQL for the tests: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: Any) -> str:
    """URL (psycopg 3 driver) of the session server's default database."""
    return str(postgres_server.url)


@pytest.fixture
def fresh_postgres_url(postgres_server: Any) -> str:
    """URL of a new, empty database on the session server, so tests never see each other's rows."""
    import uuid

    return str(postgres_server.create_database(f"t_{uuid.uuid4().hex[:16]}"))
