"""Where the audit page lives: the API server prefix, the UI routes of its views, and links into them.

Plain constants and string building, shared by the plugin definition, the extra link and the tests.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

#: Where the plugin's FastAPI app is mounted in the Airflow API server.
URL_PREFIX = "/governed-ai"
#: The page itself (the trailing slash matters: the page loads its script relative to it).
PAGE_PATH = f"{URL_PREFIX}/"

#: UI routes (``/plugin/<route>`` in the Airflow UI) of the external views; unique across all plugins.
NAV_ROUTE = "governed-ai"
DAG_ROUTE = "governed-ai-dag"
RUN_ROUTE = "governed-ai-run"
TASK_ROUTE = "governed-ai-task"
TASK_INSTANCE_ROUTE = "governed-ai-task-instance"

DEFAULT_BASE_URL = "http://localhost:8080/"


def page_href(**placeholders: str) -> str:
    """The page's path with filters as query parameters; values may be the UI's ``{DAG_ID}``-style
    placeholders, which the UI substitutes (URL-encoded), so they are not encoded here."""
    query = "&".join(f"{key}={value}" for key, value in placeholders.items())
    return f"{PAGE_PATH}?{query}" if query else PAGE_PATH


def page_url(base_url: str, **filters: str) -> str:
    """Absolute URL of the page (outside the UI frame) with the given filters."""
    query = urlencode({key: value for key, value in filters.items() if value})
    return f"{base_url.rstrip('/')}{PAGE_PATH}" + (f"?{query}" if query else "")


def task_instance_view_url(base_url: str, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """The task instance's "AI audit" tab in the Airflow UI (the page filtered to that task in that run)."""
    path = f"/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/tasks/{quote(task_id, safe='')}"
    if map_index is not None and map_index >= 0:
        path += f"/mapped/{map_index}"
    return f"{base_url.rstrip('/')}{path}/plugin/{TASK_INSTANCE_ROUTE}"
