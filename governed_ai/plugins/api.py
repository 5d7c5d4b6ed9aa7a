"""The audit and spend API, and the page that shows it, as one FastAPI app mounted by the plugin.

Every route, the page included, needs an authenticated Airflow user allowed to read the audit log of
DAGs (Airflow's own ``requires_access_dag("GET", DagAccessEntity.AUDIT_LOG)``): of the DAG named by the
``dag_id`` query parameter when there is one, else of all DAGs. No token gives 401, an invalid token or a
missing permission 403. Inside the Airflow UI the page runs in a same-origin iframe, so its requests carry
the UI's session cookie; the page never handles the token itself.

This module imports Airflow's API security module (about 1.3 s), so only the API server imports it, on
the first request to the plugin (see :mod:`governed_ai.plugins.plugin`).
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Annotated

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from governed_ai.core.audit import Decision
from governed_ai.core.audit_views import (
    MAX_RECORDS_PAGE,
    MAX_RUNS_PAGE,
    AuditFilter,
    AuditViews,
    Bucket,
    BudgetUsage,
    ChainStatus,
    FilterOptions,
    RecordsPage,
    RunsPage,
    SpendSeries,
)
from governed_ai.core.paths import default_store_url
from governed_ai.core.sqlstore import create_store_engine

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Only these files are served; nothing else under the package can be reached through the URL.
_STATIC_FILES = {"audit.js": "text/javascript", "audit.css": "text/css"}
_NO_CACHE = {"Cache-Control": "no-cache"}

#: The read permission every route requires (Airflow's own dependency; reads ``dag_id`` from the query).
read_audit_log = requires_access_dag("GET", DagAccessEntity.AUDIT_LOG)


def governance_store_url() -> str:
    """The governance store the tasks write to, found the way :class:`GovernanceHook` finds it: the
    deployment's governance connection's ``store_url`` extra (``governed_ai_governance_default``, or the
    first of ``[governed_ai] allowed_governance_conn_ids``), else ``[governed_ai] store_url``, else the
    default SQLite file under ``$AIRFLOW_HOME/governed_ai/``."""
    from governed_ai.hooks.governance import GovernanceHook

    return GovernanceHook.for_deployment().settings.store_url or default_store_url()


class _StoreViews:
    """Opens the store on first use (the API server starts without touching the governance database)."""

    def __init__(self, store_url: str | None, verify_max_age_seconds: float) -> None:
        self._store_url = store_url
        self._verify_max_age_seconds = verify_max_age_seconds
        self._views: AuditViews | None = None
        self._lock = threading.Lock()

    @property
    def store_url(self) -> str:
        if self._store_url is None:
            self._store_url = governance_store_url()
        return self._store_url

    def get(self) -> AuditViews:
        with self._lock:
            if self._views is None:
                from governed_ai.hooks.governance import GovernanceHook

                engine = create_store_engine(self.store_url)
                hook = GovernanceHook.for_deployment()
                # Never create a key here: a key the writers do not share could not verify anything, and
                # without one the page says "not verified".
                self._views = AuditViews(
                    engine,
                    key=hook.audit_key(create_dev_key=False),
                    anchors=hook.anchor_log(),
                    verify_max_age_seconds=self._verify_max_age_seconds,
                )
            return self._views


def audit_filter(
    dag_id: str | None = None,
    run_id: str | None = None,
    task_id: str | None = None,
    model: str | None = None,
    decision: Decision | None = None,
    action: str | None = None,
    since: Annotated[datetime | None, Query(description="inclusive, ISO 8601; naive means UTC")] = None,
    until: Annotated[datetime | None, Query(description="exclusive, ISO 8601; naive means UTC")] = None,
) -> AuditFilter:
    """The common filter query parameters; empty strings count as "not set" (what an empty form sends)."""
    try:
        return AuditFilter(
            dag_id=dag_id or None,
            run_id=run_id or None,
            task_id=task_id or None,
            model=model or None,
            decision=decision,
            action=action or None,
            since=since,
            until=until,
        )
    except ValidationError as error:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in error.errors())
        raise HTTPException(status_code=422, detail=f"Invalid filter: {problems}") from None


FilterDep = Annotated[AuditFilter, Depends(audit_filter)]


def store_views(request: Request) -> AuditViews:
    """The views of the app's governance store (opened on first use)."""
    source: _StoreViews = request.app.state.views
    return source.get()


ViewsDep = Annotated[AuditViews, Depends(store_views)]


def not_per_dag(request: Request) -> None:
    """For data that spans DAGs (budgets, the hash chain): refuse a ``dag_id`` parameter, so that the
    permission check (which reads it) is the one for all DAGs, never one DAG's."""
    if "dag_id" in request.query_params:
        raise HTTPException(
            status_code=422,
            detail=f"{request.url.path} is not per DAG: remove the dag_id parameter (reading it needs "
            "permission to read the audit log of all DAGs).",
        )


def create_app(store_url: str | None = None, *, verify_max_age_seconds: float = 30.0) -> FastAPI:
    """The plugin's app. ``store_url`` None means: find the store as the tasks do, on first request."""
    source = _StoreViews(store_url, verify_max_age_seconds)
    app = FastAPI(
        title="Governed AI: audit trail and spend",
        # The interactive docs would be routes without the permission check: keep every route guarded.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(read_audit_log)],
    )
    app.state.views = source

    @app.exception_handler(SQLAlchemyError)
    async def _store_unavailable(request: Request, error: SQLAlchemyError) -> JSONResponse:
        where = make_url(source.store_url).render_as_string(hide_password=True)
        return JSONResponse(
            status_code=503,
            content={
                "detail": f"The governance store {where} cannot be read ({type(error).__name__}). Check "
                "[governed_ai] store_url and that the database is reachable from the API server."
            },
        )

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_NO_CACHE)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        media_type = _STATIC_FILES.get(name)
        if media_type is None:
            raise HTTPException(status_code=404, detail=f"No static file {name!r}")
        return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_NO_CACHE)

    @app.get("/api/runs", response_model=RunsPage)
    def runs(
        views: ViewsDep,
        filters: FilterDep,
        limit: Annotated[int, Query(ge=1, le=MAX_RUNS_PAGE)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> RunsPage:
        """Per DAG run: calls, denials with their rules, tokens, cost, latency; newest activity first."""
        return views.runs(filters, limit=limit, offset=offset)

    @app.get("/api/records", response_model=RecordsPage)
    def records(
        views: ViewsDep,
        filters: FilterDep,
        limit: Annotated[int, Query(ge=1, le=MAX_RECORDS_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> RecordsPage:
        """Audit records, newest first; a denial's ``rule`` and ``error`` (the reason) are included."""
        return views.records(filters, limit=limit, offset=offset)

    @app.get("/api/spend", response_model=SpendSeries)
    def spend(views: ViewsDep, filters: FilterDep, bucket: Bucket = "day") -> SpendSeries:
        """Cost and tokens per UTC day (or hour) and DAG, for the chart."""
        return views.spend(filters, bucket=bucket)

    @app.get("/api/budgets", response_model=list[BudgetUsage], dependencies=[Depends(not_per_dag)])
    def budgets(
        views: ViewsDep,
        budget: str | None = None,
        period: Annotated[str | None, Query(description="one period key, e.g. a run_id")] = None,
        history: Annotated[int, Query(ge=1, le=366, description="most recent periods per budget")] = 1,
    ) -> list[BudgetUsage]:
        """Budget usage (spent and held) against the limits, per period."""
        return views.budgets(budget=budget or None, period=period or None, history=history)

    @app.get("/api/verify", response_model=ChainStatus, dependencies=[Depends(not_per_dag)])
    def verify(views: ViewsDep, refresh: bool = False) -> ChainStatus:
        """Whether the audit hash chain is intact (recomputed at most every few seconds)."""
        return views.chain_status(refresh=refresh)

    @app.get("/api/options", response_model=FilterOptions)
    def options(views: ViewsDep, dag_id: str | None = None) -> FilterOptions:
        """Values for the filter pickers: DAGs, tasks, models and actions seen in the audit trail."""
        return views.options(dag_id=dag_id or None)

    return app
