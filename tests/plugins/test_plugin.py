"""The plugin definition as Airflow loads it, its lazily built app, and the extra link."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from governed_ai.plugins import urls
from governed_ai.plugins.plugin import AuditAppOnFirstRequest, GovernedAIPlugin

REPO = Path(__file__).resolve().parents[2]
PLACEHOLDERS = {
    "nav": set(),
    "dag": {"{DAG_ID}"},
    "dag_run": {"{DAG_ID}", "{RUN_ID}"},
    "task": {"{DAG_ID}", "{TASK_ID}"},
    "task_instance": {"{DAG_ID}", "{RUN_ID}", "{TASK_ID}"},
}


def test_the_app_is_mounted_outside_the_prefixes_airflow_refuses():
    from airflow.api_fastapi.app import RESERVED_URL_PREFIXES

    (app,) = GovernedAIPlugin.fastapi_apps
    assert app["url_prefix"] == urls.URL_PREFIX
    assert not any(app["url_prefix"].startswith(prefix) for prefix in RESERVED_URL_PREFIXES)


def test_there_is_one_view_per_place_and_each_opens_the_page_filtered_to_it():
    views = {view["destination"]: view for view in GovernedAIPlugin.external_views}

    assert set(views) == set(PLACEHOLDERS)
    routes = [view["url_route"] for view in GovernedAIPlugin.external_views]
    assert len(set(routes)) == len(routes), "url_route must be unique or Airflow drops the view"
    for destination, view in views.items():
        assert view["href"].startswith(urls.PAGE_PATH)
        used = {part for part in PLACEHOLDERS["task_instance"] | {"{MAP_INDEX}"} if part in view["href"]}
        assert used == PLACEHOLDERS[destination], destination
    assert views["nav"]["category"] == "browse"


def test_loading_the_plugin_module_imports_neither_fastapi_nor_airflows_api_security(tmp_path):
    probe = (
        "import sys, governed_ai.plugins.plugin as p\n"
        "heavy = ['fastapi', 'airflow.api_fastapi.core_api.security', 'governed_ai.plugins.api']\n"
        "print([m for m in heavy if m in sys.modules], p.audit_app.built)\n"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}

    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[] False"


def test_airflow_loads_the_plugin_with_all_its_views(tmp_path):
    """`airflow plugins` in a fresh process with a plugins folder that imports the plugin (what the
    entry point will do once it is registered)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "governed_ai_plugin.py").write_text(
        "from governed_ai.plugins.plugin import GovernedAIPlugin\n"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins)}

    result = subprocess.run(
        [sys.executable, "-m", "airflow", "plugins", "--output", "json"],
        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    # Airflow may log lines of its own before the JSON document (the last line).
    listing = result.stdout.strip().splitlines()[-1]
    loaded = {plugin["name"]: plugin for plugin in json.loads(listing)}
    ours = loaded[GovernedAIPlugin.name]
    assert ours["external_views"] == GovernedAIPlugin.external_views
    assert [app["url_prefix"] for app in ours["fastapi_apps"]] == [urls.URL_PREFIX]
    assert ours["operator_extra_links"] == ["<governed_ai.plugins.links.AuditRecordsLink object>"]


def test_the_app_is_built_on_its_first_request_and_serves_under_the_prefix(make_client, filled_store):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from governed_ai.plugins.api import create_app

    builds: list[str] = []

    def factory():
        builds.append("built")
        return create_app(filled_store.url)

    lazy = AuditAppOnFirstRequest(factory)
    parent = FastAPI()
    parent.mount(urls.URL_PREFIX, lazy)
    assert not lazy.built
    token = make_client(filled_store.url).headers["Authorization"]
    client = TestClient(parent, headers={"Authorization": token})

    page = client.get(urls.PAGE_PATH)
    runs = client.get(f"{urls.URL_PREFIX}/api/runs")

    assert page.status_code == 200 and "static/audit.js" in page.text
    assert runs.json()["totals"]["records"] == len(filled_store.audit.query(limit=None))
    assert builds == ["built"]


# -- the extra link ----------------------------------------------------------------------------------------


def test_the_link_opens_the_task_instance_tab_under_the_configured_base_url(monkeypatch):
    from airflow.sdk.types import TaskInstanceKey

    from governed_ai.plugins.links import AuditRecordsLink

    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/")
    run_id = "manual__2026-11-25T10:00:00+00:00"

    plain = AuditRecordsLink().get_link(None, ti_key=TaskInstanceKey("my dag", "ask", run_id))  # type: ignore[arg-type]
    mapped = AuditRecordsLink().get_link(None, ti_key=TaskInstanceKey("d", "t", "r", map_index=3))  # type: ignore[arg-type]

    assert plain == (
        "https://airflow.example.com/dags/my%20dag/runs/manual__2026-11-25T10%3A00%3A00%2B00%3A00"
        f"/tasks/ask/plugin/{urls.TASK_INSTANCE_ROUTE}"
    )
    assert (
        mapped
        == f"https://airflow.example.com/dags/d/runs/r/tasks/t/mapped/3/plugin/{urls.TASK_INSTANCE_ROUTE}"
    )


def test_an_operator_declaring_the_link_keeps_it_through_dag_serialization():
    """What the lead's one-line change to each AI operator gives the API server: the link's button."""
    import pendulum
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    from governed_ai.operators.llm import LLMOperator
    from governed_ai.plugins.links import AuditRecordsLink

    class LinkedLLMOperator(LLMOperator):
        operator_extra_links = (AuditRecordsLink(),)

    with DAG("linked", start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), schedule=None) as dag:
        LinkedLLMOperator(task_id="ask", prompt="hello")

    task = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag)).get_task("ask")

    assert task.extra_links == [AuditRecordsLink.name]
    (link,) = task.operator_extra_links
    assert link.xcom_key == AuditRecordsLink().xcom_key


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, "http://h:8080/governed-ai/"),
        ({"dag_id": "a b", "run_id": ""}, "http://h:8080/governed-ai/?dag_id=a+b"),
    ],
)
def test_page_urls_carry_only_the_given_filters(filters, expected):
    assert urls.page_url("http://h:8080/", **filters) == expected
