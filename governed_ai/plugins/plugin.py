"""The Airflow plugin: the "AI governance" page in the UI, its API, and the per-DAG/run/task tabs.

Registered through the ``airflow.plugins`` entry point, so Airflow imports this module in every process
(scheduler, workers, DAG processor, API server). It therefore imports nothing heavy: the FastAPI app and
Airflow's API security module are imported and built on the first request the API server routes to
the plugin.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from airflow.providers.common.compat.sdk import AirflowPlugin

from governed_ai.plugins import listener
from governed_ai.plugins.links import AuditRecordsLink
from governed_ai.plugins.urls import (
    DAG_ROUTE,
    NAV_ROUTE,
    PAGE_PATH,
    RUN_ROUTE,
    TASK_INSTANCE_ROUTE,
    TASK_ROUTE,
    URL_PREFIX,
    page_href,
)

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


class AuditAppOnFirstRequest:
    """An ASGI app that builds :func:`governed_ai.plugins.api.create_app` when it is first called.

    Airflow mounts whatever ASGI app a plugin names; deferring the build keeps the import of this plugin
    cheap in the processes that never serve it.
    """

    def __init__(self, factory: Callable[[], _ASGIApp] | None = None) -> None:
        self._factory = factory
        self._app: _ASGIApp | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        """Whether the real app has been built (tests check that loading the plugin does not)."""
        return self._app is not None

    def _build(self) -> _ASGIApp:
        with self._lock:
            if self._app is None:
                if self._factory is None:
                    from governed_ai.plugins.api import create_app

                    self._app = create_app()
                else:
                    self._app = self._factory()
            return self._app

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        app = self._app
        if app is None:
            import anyio.to_thread

            # The first build imports Airflow's API security module (about a second): off the event loop.
            app = await anyio.to_thread.run_sync(self._build)
        await app(scope, receive, send)


audit_app = AuditAppOnFirstRequest()


class GovernedAIPlugin(AirflowPlugin):
    """Audit trail, spend and budgets of governed AI calls in the Airflow UI.

    - ``/governed-ai/`` in the API server: the page and its JSON API (``/governed-ai/api/...``), readable
      by users who may read DAGs' audit logs.
    - "AI governance" under Browse, and an "AI audit" tab on DAGs, DAG runs, tasks and task instances
      that opens the page filtered to them.
    - :class:`AuditRecordsLink`, the extra link the AI operators declare.
    - :mod:`governed_ai.plugins.listener`, which anchors the audit chain head when a task ends.
    """

    name = "governed_ai"
    fastapi_apps = [{"app": audit_app, "url_prefix": URL_PREFIX, "name": "Governed AI audit"}]
    external_views = [
        {
            "name": "AI governance",
            "href": PAGE_PATH,
            "destination": "nav",
            "url_route": NAV_ROUTE,
            "category": "browse",
        },
        {
            "name": "AI audit",
            "href": page_href(dag_id="{DAG_ID}"),
            "destination": "dag",
            "url_route": DAG_ROUTE,
        },
        {
            "name": "AI audit",
            "href": page_href(dag_id="{DAG_ID}", run_id="{RUN_ID}"),
            "destination": "dag_run",
            "url_route": RUN_ROUTE,
        },
        {
            "name": "AI audit",
            "href": page_href(dag_id="{DAG_ID}", task_id="{TASK_ID}"),
            "destination": "task",
            "url_route": TASK_ROUTE,
        },
        {
            "name": "AI audit",
            "href": page_href(dag_id="{DAG_ID}", run_id="{RUN_ID}", task_id="{TASK_ID}"),
            "destination": "task_instance",
            "url_route": TASK_INSTANCE_ROUTE,
        },
    ]
    operator_extra_links = [AuditRecordsLink()]
    # Anchors the audit chain head at the end of every task instance that wrote to it.
    listeners = [listener]
