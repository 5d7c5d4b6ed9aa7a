"""Where the provider's errors become Airflow's: the one translation every operator uses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from airflow.providers.common.compat.sdk import AirflowFailException

from governed_ai.core.errors import GovernanceDenied, GovernedAIError


@contextmanager
def airflow_errors(task_id: str) -> Iterator[None]:
    """Permanent errors (denials, bad configuration, invalid input, calls in doubt) fail the task at once,
    without retries (``AirflowFailException``); transient ones propagate, so the task's retries apply."""
    try:
        yield
    except GovernedAIError as error:
        if not error.permanent:
            raise
        what = "denied by governance" if isinstance(error, GovernanceDenied) else "cannot run"
        raise AirflowFailException(f"{task_id}: {what}: {error}") from error
