"""Session setup of the compatibility suite, which ``scripts/compat.sh`` runs in a venv per Airflow line.

The provider is the wheel built from this checkout, installed into that venv (not editable); the driver runs
pytest with ``--confcutdir`` at this folder (the main suite's conftest does not apply) and
``--import-mode=append`` (the checkout never shadows the installed package). The main suite skips this
folder. Airflow reads its configuration when first imported, so the environment is set here, first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXAMPLE_DAGS = Path(os.environ.get("GOVERNED_AI_EXAMPLE_DAGS", HERE.parents[1] / "example_dags"))
COMPAT_DAGS = HERE / "dags"
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="governed-ai-compat-"))

os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(COMPAT_DAGS)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__GOVERNED_AI__POLICY_PATH"] = str(HERE / "compat_policy.yaml")
os.environ.pop("AIRFLOW__GOVERNED_AI__STORE_URL", None)
os.environ.pop("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", None)


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[Path]:
    """A fresh Airflow metadata database (SQLite) for ``dag.test()``."""
    from airflow.utils import db

    db.resetdb()
    yield AIRFLOW_HOME


def dagbag_class() -> type:
    """Airflow's DagBag, which moved to ``airflow.dag_processing.dagbag`` in 3.2."""
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1
        from airflow.models.dagbag import DagBag
    return DagBag  # type: ignore[no-any-return]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(AIRFLOW_HOME, ignore_errors=True)
