"""Test session setup: a private Airflow home and database, the real local model on demand.

Airflow reads its configuration at import time, so the environment is set before anything imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="governed-ai-tests-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "example_dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ.pop("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", None)


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)
