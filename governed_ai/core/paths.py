"""Where the provider keeps its files by default: under ``$AIRFLOW_HOME/governed_ai/``.

Read from the environment, not from Airflow's config, so the CLI and the local-model command agree with
the hooks without importing Airflow.
"""

from __future__ import annotations

import os
from pathlib import Path


def provider_home() -> Path:
    """``$AIRFLOW_HOME/governed_ai`` (Airflow's own default home is ``~/airflow``)."""
    return Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow")) / "governed_ai"


def default_store_url() -> str:
    """The SQLite file that holds the audit trail and budget ledger when no store URL is configured."""
    home = provider_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'governance.db'}"
