"""Extra link from an AI operator's task instance to its audit records."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.providers.common.compat.sdk import BaseOperatorLink

from governed_ai.plugins.urls import DEFAULT_BASE_URL, task_instance_view_url

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import BaseOperator, TaskInstanceKey


class AuditRecordsLink(BaseOperatorLink):
    """ "AI audit records" on the task instance: opens its "AI audit" tab in the Airflow UI, which lists
    every governed call, denial, token and dollar of that task in that run.

    Operators declare it with ``operator_extra_links = (AuditRecordsLink(),)``. In Airflow 3 the worker
    computes the URL when the task finishes (whatever its state, so denied tasks get the link too) and
    stores it in XCom; the URL starts with ``[api] base_url``, like Airflow's own log links.
    """

    name = "AI audit records"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.providers.common.compat.sdk import conf

        base_url = conf.get("api", "base_url", fallback=DEFAULT_BASE_URL) or DEFAULT_BASE_URL
        map_index = getattr(ti_key, "map_index", -1)
        return task_instance_view_url(
            base_url, ti_key.dag_id, ti_key.run_id, ti_key.task_id, -1 if map_index is None else map_index
        )
