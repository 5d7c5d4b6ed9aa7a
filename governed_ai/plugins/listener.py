"""Task-instance listener: secrets in a governed task's rendered fields are masked (and what the policy
redacts from prompts redacted) before it runs and again when it ends, and when a task ends the audit chain
head it wrote to is anchored.

Runs in the task's own process (Airflow calls task-instance listeners there, ``dag.test()`` included), so
the anchor line lands in the task log and the anchor file is written next to the others. Imported by the
plugin in every Airflow process, so it imports nothing heavy until a task actually ends.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from pluggy import HookimplMarker

hookimpl = HookimplMarker("airflow")
logger = logging.getLogger(__name__)


def _task_ended(task_instance: Any) -> None:
    try:
        from governed_ai.hooks.governance import store_redacted_rendered_fields

        # Airflow may have stored the rendered fields again from the raw values as the task ended.
        store_redacted_rendered_fields(task_instance)
    except Exception:  # a listener must never change the task's outcome
        logger.exception("could not store the redacted rendered fields at the end of the task")
    try:
        gateway = sys.modules.get("governed_ai.core.openai_gateway")  # only if this process handed one out
        if gateway is not None:
            # SDK clients the task's code left open: settle their budget blocks, flush their writes.
            gateway.close_open_gateways()
    except Exception:  # a listener must never change the task's outcome
        logger.exception("could not close the governed OpenAI clients left open by the task")
    try:
        from governed_ai.hooks.governance import anchor_audit_chains

        anchor_audit_chains()
    except Exception:  # a listener must never change the task's outcome
        logger.exception("could not anchor the audit chain at the end of the task")


@hookimpl
def on_task_instance_running(previous_state: Any, task_instance: Any) -> None:
    try:
        from governed_ai.hooks.governance import register_secrets_in_rendered_fields

        register_secrets_in_rendered_fields(task_instance)
    except Exception:  # a listener must never change the task's outcome
        logger.exception("could not scan the rendered fields for secrets")


@hookimpl
def on_task_instance_success(previous_state: Any, task_instance: Any) -> None:
    _task_ended(task_instance)


@hookimpl
def on_task_instance_failed(previous_state: Any, task_instance: Any, error: Any) -> None:
    _task_ended(task_instance)
