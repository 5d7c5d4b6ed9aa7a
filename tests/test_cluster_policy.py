"""Parse-time enforcement (governed_ai.cluster_policy): a task asking for what the policy does not grant is
an import error naming the rule to change; what is granted, templated or left to the connection passes.

The first tests drive :func:`denials` with real operators in a real DAG object and a real policy engine;
the last one enables the policy the way a deployment does (``airflow_local_settings.py``) and lets Airflow's
own DagBag parse DAG files in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from governed_ai.cluster_policy import denials
from governed_ai.core.policy.loader import engine_from_text
from governed_ai.core.tools import ToolRegistry, tool
from governed_ai.operators.agent import AgentOperator
from governed_ai.operators.chroma import ChromaIngestOperator, ChromaQueryOperator
from governed_ai.operators.llm import LLMOperator
from governed_ai.operators.tool import ToolOperator

POLICY = """
version: 1
rules:
  - name: support
    match: {dag_id: "support_*"}
    models:
      - {connection: "governed_ai_llm_default", model: "smollm2*"}
    model_routes:
      default: {model: smollm2, fallbacks: [smollm2-q8]}
    tools:
      - name: lookup_order
    collections:
      - {name: "kb_*", read: true, write: false}
  - name: prod-only
    match: {dag_id: "support_*", bundle: "prod-*"}
    models:
      - {connection: "governed_ai_llm_default", model: "frontier-large"}
"""

REGISTRY = ToolRegistry(name="cluster-policy-tests")


@tool(registry=REGISTRY, description="Status of an order.")
def lookup_order(order_id: str) -> dict[str, str]:
    return {"order_id": order_id, "status": "shipped"}


@tool(registry=REGISTRY, description="Refund an order.", side_effects=True)
def issue_refund(order_id: str) -> dict[str, str]:
    return {"order_id": order_id, "refunded": "yes"}


def _dag(dag_id: str) -> DAG:
    return DAG(dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), tags=["support"])


def test_granted_model_tool_and_collection_pass() -> None:
    engine = engine_from_text(POLICY)
    with _dag("support_triage"):
        tasks = [
            LLMOperator(task_id="classify", prompt="hi", model="smollm2"),
            LLMOperator(task_id="routed", prompt="hi", model="default"),
            ToolOperator(
                task_id="lookup", tool="lookup_order", registry=REGISTRY, arguments={"order_id": "X"}
            ),
            ChromaQueryOperator(task_id="query", collection="kb_support", query="refunds"),
        ]
    assert [denials(engine, task) for task in tasks] == [[], [], [], []]


def test_ungranted_model_names_the_rule_to_change() -> None:
    engine = engine_from_text(POLICY)
    with _dag("support_triage"):
        task = LLMOperator(task_id="classify", prompt="hi", model="gpt-5")
    found = denials(engine, task)
    assert len(found) == 1
    assert found[0].what == "model 'gpt-5' on connection 'governed_ai_llm_default'"
    assert "models: [{connection: 'governed_ai_llm_default', model: 'gpt-5'}]" in found[0].reason
    assert "'support'" in found[0].reason  # the matching rule that could grant it


def test_agent_tools_and_collection_writes_are_checked() -> None:
    engine = engine_from_text(POLICY)
    with _dag("support_triage"):
        agent = AgentOperator(
            task_id="agent",
            prompt="help",
            model="smollm2",
            tools=["lookup_order", "issue_refund"],
            registry=REGISTRY,
        )
        ingest = ChromaIngestOperator(task_id="ingest", collection="kb_support", documents=["a"])
    assert [d.what for d in denials(engine, agent)] == ["tool 'issue_refund'"]
    assert [d.what for d in denials(engine, ingest)] == ["write of collection 'kb_support'"]


def test_templated_and_connection_default_models_are_left_to_run_time() -> None:
    engine = engine_from_text(POLICY)
    with _dag("support_triage"):
        templated = LLMOperator(task_id="templated", prompt="hi", model="{{ var.value.model }}")
        unset = LLMOperator(task_id="unset", prompt="hi")
    assert denials(engine, templated) == []
    assert denials(engine, unset) == []


def test_a_dag_no_rule_matches_is_refused() -> None:
    engine = engine_from_text(POLICY)
    with _dag("marketing_blast"):
        task = LLMOperator(task_id="write", prompt="hi", model="smollm2")
    found = denials(engine, task)
    assert len(found) == 1 and "no rule matches this task" in found[0].reason


def test_bundle_rules_get_the_benefit_of_the_doubt_only_when_the_bundle_is_unknown() -> None:
    engine = engine_from_text(POLICY)
    with _dag("support_triage"):
        task = LLMOperator(task_id="big", prompt="hi", model="frontier-large")
    assert denials(engine, task, bundle=None) == []
    assert denials(engine, task, bundle="prod-eu") == []
    refused = denials(engine, task, bundle="dev-alice")
    assert len(refused) == 1 and "frontier-large" in refused[0].what


def test_a_policy_that_does_not_load_refuses_everything() -> None:
    engine = engine_from_text("version: 1\nrules: [{name: broken, bogus_key: 1}]\n")
    with _dag("support_triage"):
        task = LLMOperator(task_id="classify", prompt="hi", model="smollm2")
    found = denials(engine, task)
    assert len(found) == 1 and "bogus_key" in found[0].reason


def test_airflow_reports_an_import_error_when_the_deployment_enables_the_policy(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    settings_dir = tmp_path / "config"
    settings_dir.mkdir()
    (settings_dir / "airflow_local_settings.py").write_text(
        "from governed_ai.cluster_policy import task_policy  # noqa: F401\n"
    )
    dags = tmp_path / "dags"
    dags.mkdir()
    dag_source = textwrap.dedent(
        """
        import pendulum
        from airflow.sdk import DAG
        from governed_ai.operators.llm import LLMOperator

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
            LLMOperator(task_id="classify", prompt="hi", model="{model}")
        """
    )
    (dags / "granted.py").write_text(dag_source.format(dag_id="support_ok", model="smollm2"))
    (dags / "refused.py").write_text(dag_source.format(dag_id="support_bad", model="gpt-5"))
    probe = textwrap.dedent(
        f"""
        import json
        try:
            from airflow.dag_processing.dagbag import DagBag
        except ImportError:  # Airflow < 3.2
            from airflow.models.dagbag import DagBag
        bag = DagBag(dag_folder={str(dags)!r})
        errors = {{path.rsplit("/", 1)[-1]: text for path, text in bag.import_errors.items()}}
        print(json.dumps({{"dags": sorted(bag.dag_ids), "errors": errors}}))
        """
    )
    home = tmp_path / "airflow-home"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(settings_dir), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "AIRFLOW__GOVERNED_AI__POLICY_PATH": str(tmp_path / "policy.yaml"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["dags"] == ["support_ok"]
    assert list(report["errors"]) == ["refused.py"]
    error = report["errors"]["refused.py"]
    assert "governed_ai: the governance policy does not grant task 'classify'" in error
    assert (
        "model 'gpt-5'" in error
        and "models: [{connection: 'governed_ai_llm_default', model: 'gpt-5'}]" in error
    )
