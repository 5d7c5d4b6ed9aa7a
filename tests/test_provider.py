"""The package is a real Airflow provider: discovered through its entry point, with UI metadata."""

from __future__ import annotations

import importlib
from importlib.metadata import distribution, entry_points

from governed_ai.get_provider_info import get_provider_info


def test_entry_point_points_at_provider_info():
    (ep,) = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("governed_ai")]
    assert ep.load() is get_provider_info


def test_package_name_matches_distribution():
    assert (
        get_provider_info()["package-name"] == distribution("airflow-provider-governed-ai").metadata["Name"]
    )


def test_every_declared_module_and_hook_imports():
    info = get_provider_info()
    for section in ("hooks", "operators", "sensors", "triggers"):
        for entry in info[section]:
            for module in entry["python-modules"]:
                importlib.import_module(module)
    for conn in info["connection-types"]:
        module, _, cls = conn["hook-class-name"].rpartition(".")
        hook = getattr(importlib.import_module(module), cls)
        assert hook.conn_type == conn["connection-type"]


def test_airflow_providers_manager_sees_the_connection_form():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-provider-governed-ai" in manager.providers
    widgets = manager.connection_form_widgets
    assert "extra__governed_ai_llm__default_model" in widgets
    assert widgets["extra__governed_ai_llm__structured_output"].field["schema"]["enum"] == [
        "json_schema",
        "json_object",
    ]
    behaviour = manager.field_behaviours["governed_ai_llm"]
    assert behaviour["relabeling"]["host"] == "Base URL"


def test_chroma_connection_form_is_registered():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    embedding = manager.connection_form_widgets["extra__governed_ai_chroma__embedding"]
    assert embedding.field["schema"]["enum"] == ["offline", "openai"]
    assert manager.field_behaviours["governed_ai_chroma"]["relabeling"]["password"] == "Auth token"
