"""The provider, installed from its wheel, on one Airflow line (``scripts/compat.sh`` picks the line).

Checks what a platform engineer sees after ``pip install``: the provider is listed, the example DAGs parse,
the plugin loads, the connection forms show their fields, and every operator runs through ``dag.test()``
against the fake model server (``tests/fakes``), with Chroma sources named the same way on every line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.compat.conftest import COMPAT_DAGS, EXAMPLE_DAGS, dagbag_class
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

pytestmark = pytest.mark.compat

DISTRIBUTION = "airflow-provider-governed-ai"
EXAMPLE_DAG_IDS = {
    "catalog_enrichment",
    "governance_showcase",
    "kb_answering",
    "kb_ingest",
    "order_agent",
    "support_quality_gate",
    "support_triage",
}
LABEL = json.dumps({"label": "positive", "summary": "a happy customer"})


def test_the_provider_comes_from_the_installed_wheel_on_the_expected_airflow_line() -> None:
    from importlib.metadata import distribution

    import airflow

    import governed_ai

    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(governed_ai.__file__).resolve().is_relative_to(site_packages), governed_ai.__file__
    direct_url = distribution(DISTRIBUTION).read_text("direct_url.json") or "{}"
    assert not json.loads(direct_url).get("dir_info", {}).get("editable", False)
    expected_line = os.environ.get("GOVERNED_AI_COMPAT_AIRFLOW")
    if expected_line:
        assert airflow.__version__.startswith(expected_line + "."), airflow.__version__
    # The tokenizer of the offline embeddings ships inside the wheel.
    assert (Path(governed_ai.__file__).parent / "core" / "retrieval" / "minilm" / "tokenizer.json").is_file()


def test_installing_the_wheel_into_this_deployment_leaves_airflow_as_it_was() -> None:
    """What ``pip install airflow-provider-governed-ai[chroma,validation]`` would change in this venv: only
    the provider (a floor above this Airflow would upgrade Airflow and force a database migration)."""
    wheel, uv = os.environ.get("GOVERNED_AI_COMPAT_WHEEL"), os.environ.get("UV")
    if not wheel or not uv:
        pytest.skip("run by scripts/compat.sh, which passes the wheel and uv")
    done = subprocess.run(
        [uv, "pip", "install", "--dry-run", "--python", sys.executable,
         "--reinstall-package", DISTRIBUTION, f"{wheel}[chroma,validation]"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    changes = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith(("+ ", "- "))]
    assert changes, done.stderr  # the provider itself is reinstalled, so the dry run lists it
    assert {change[2:].split("==")[0].split(" ")[0] for change in changes} == {DISTRIBUTION}, changes


def test_airflow_providers_list_shows_the_provider() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "airflow", "providers", "list", "--output", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Log lines may precede the JSON document (e.g. "[info ] Unit test configuration loaded ...").
    listed = json.loads(done.stdout[done.stdout.index('[{"package_name"') :])
    assert DISTRIBUTION in {p["package_name"] for p in listed}, listed


def test_the_example_dags_parse_without_import_errors(airflow_db: Path) -> None:
    dagbag = dagbag_class()(dag_folder=str(EXAMPLE_DAGS), include_examples=False)

    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) >= EXAMPLE_DAG_IDS


def test_the_plugin_loads_with_its_views_link_and_app() -> None:
    from airflow import plugins_manager

    from governed_ai.plugins.api import create_app
    from governed_ai.plugins.links import AuditRecordsLink

    (info,) = [p for p in plugins_manager.get_plugin_info() if p["name"] == "governed_ai"]
    assert {v["destination"] for v in info["external_views"]} == {
        "nav",
        "dag",
        "dag_run",
        "task",
        "task_instance",
    }
    assert [a["url_prefix"] for a in info["fastapi_apps"]] == ["/governed-ai"]
    assert create_app().routes  # builds on Airflow's API security module of this line

    from airflow.providers.common.compat.sdk import TaskInstanceKey

    link = AuditRecordsLink().get_link(
        None,  # type: ignore[arg-type]  # the link needs only the key
        ti_key=TaskInstanceKey(dag_id="d", task_id="t", run_id="r", try_number=1, map_index=-1),
    )
    assert "/dags/d/runs/r/tasks/t/" in link, link  # the task instance's "AI audit" tab


@pytest.mark.parametrize("conn_type", ["governed_ai_llm", "governed_ai_chroma", "governed_ai_governance"])
def test_the_connection_form_shows_its_fields(conn_type: str) -> None:
    """What the UI's connection form is built from (the API server's hook metadata), on this line."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    from governed_ai.get_provider_info import get_provider_info

    (declared,) = [c for c in get_provider_info()["connection-types"] if c["connection-type"] == conn_type]
    (meta,) = [m for m in HookMetaService.hook_meta_data() if m.connection_type == conn_type]

    assert meta.hook_name == declared["hook-name"]
    shown = meta.extra_fields or {}
    assert set(shown) == set(declared["conn-fields"]), shown
    for name, spec in declared["conn-fields"].items():
        assert shown[name]["schema"]["title"] == spec["label"], (name, shown[name])
    behaviour = declared["ui-field-behaviour"]
    standard = meta.standard_fields
    assert standard is not None
    for hidden in behaviour["hidden-fields"]:
        field = getattr(standard, "url_schema" if hidden == "schema" else hidden)
        assert field is not None and field.hidden, hidden
    for name, label in behaviour["relabeling"].items():
        field = getattr(standard, "url_schema" if name == "schema" else name)
        assert field is not None and field.title == label, name


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    """The named fake model server; the default LLM connection points at it."""
    with FakeOpenAIServer(models=("fake-model",), default=ScriptedReply(content=LABEL)) as server:
        connection = server.connection_json(default_model="fake-model")
        monkeypatch.setenv("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", connection)
        yield server


def run_compat_dag(dag_id: str) -> dict[str, Any]:
    """``dag.test()`` of one compat DAG; every task must succeed. Returns what each task returned."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dagbag = dagbag_class()(dag_folder=str(COMPAT_DAGS), include_examples=False)
    assert dagbag.import_errors == {}
    run = dagbag.dags[dag_id].test()
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert all(state == "success" for state in states.values()), states
    assert str(run.state) == "success"
    query = XComModel.get_many(run_id=run.run_id, dag_ids=dag_id, key="return_value")
    with create_session() as session:
        return {row.task_id: XComModel.deserialize_value(row) for row in session.scalars(query)}


def test_llm_batch_and_quality_gate_operators_run(airflow_db: Path, fake_model: FakeOpenAIServer) -> None:
    values = run_compat_dag("compat_llm")

    assert values["single"]["output"] == json.loads(LABEL)
    batch = values["batch"]
    assert sorted(r["key"] for r in batch["results"]) == [f"T{i}" for i in range(5)], batch
    assert batch["failures"] == []
    report = values["gate"]["report"]
    assert (report["passed_rows"], report["quarantined_rows"]) == (1, 2), report
    assert len(fake_model.chat_requests) == 6  # one single call, five batch items


def test_tool_and_agent_operators_run(airflow_db: Path, fake_model: FakeOpenAIServer) -> None:
    fake_model.script(
        json.dumps({"tool": "lookup_order", "arguments": {"order_id": "AB123456"}}),
        json.dumps({"tool": "final", "answer": "Order AB123456 has shipped."}),
    )

    values = run_compat_dag("compat_tools")

    assert values["direct"]["result"] == "HELLO", values["direct"]
    agent = values["agent"]
    assert agent["final"] == "Order AB123456 has shipped."
    assert [(s["tool"], s["outcome"]) for s in agent["transcript"]] == [("lookup_order", "ok"), (None, "ok")]


def test_chroma_operators_name_sources_alike_purge_by_source_and_rerun_idempotently(
    airflow_db: Path, fake_model: FakeOpenAIServer
) -> None:
    first = run_compat_dag("compat_chroma")

    assert first["ingest"]["new_chunks"] == first["ingest"]["chunks"] > 0
    contexts = first["query"]["contexts"]
    # Relative POSIX names on every line (universal-pathlib < 0.3 would give file:///... URIs).
    assert {c["source"] for c in contexts} <= {"returns.md", "guides/shipping.md"}, contexts
    assert contexts[0]["source"] == "guides/shipping.md"
    assert first["purge"]["deleted"] >= 1  # the purge by source found the chunks it names

    # The rerun re-adds exactly what the purge deleted and rewrites nothing else.
    second = run_compat_dag("compat_chroma_rerun")
    assert second["ingest"]["new_chunks"] == first["purge"]["deleted"], (first, second)
    assert second["ingest"]["collection_count"] == first["ingest"]["collection_count"]
