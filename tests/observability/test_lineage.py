"""OpenLineage from the operators: facets built, emitted by a real OpenLineage client, absent-safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from governed_ai.operators.chroma import ChromaIngestOperator, ChromaQueryOperator
from governed_ai.operators.llm import LLMOperator
from tests.conftest import fake_context
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "governed_ai" / "core" / "observability" / "GovernedAIRunFacet.json"
POLICY = """
version: 1
rules:
  - name: lineage
    match: {dag_id: lineage_dag}
    models: [{connection: governed_ai_llm_default, model: fake-model}]
    collections: [{name: "kb_*", read: true, write: true}]
"""


def emit_and_read(lineage, tmp_path: Path) -> dict:
    """Send a COMPLETE event with the operator's lineage through the real client's file transport."""
    from openlineage.client import OpenLineageClient
    from openlineage.client.event_v2 import Job, Run, RunEvent, RunState
    from openlineage.client.transport.file import FileConfig, FileTransport
    from openlineage.client.uuid import generate_new_uuid

    path = tmp_path / "lineage.jsonl"
    client = OpenLineageClient(transport=FileTransport(FileConfig(log_file_path=str(path), append=True)))
    client.emit(
        RunEvent(
            eventType=RunState.COMPLETE,
            eventTime="2026-11-25T12:00:00Z",
            run=Run(runId=str(generate_new_uuid()), facets=lineage.run_facets),
            job=Job(namespace="airflow", name="lineage_dag.task"),
            producer="https://github.com/governed-ai/airflow-provider-governed-ai",
            inputs=lineage.inputs,
            outputs=lineage.outputs,
        )
    )
    (line,) = path.read_text().splitlines()
    return json.loads(line)


def validate_facet(facet: dict) -> None:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    own = {k: v for k, v in schema["$defs"]["GovernedAIRunFacet"]["allOf"][1].items()}
    jsonschema.validate(facet, own)


@pytest.fixture
def env(governance_policy, monkeypatch, tmp_path):
    governance_policy(POLICY)
    monkeypatch.setenv(
        "AIRFLOW_CONN_GOVERNED_AI_CHROMA_DEFAULT",
        json.dumps({"conn_type": "governed_ai_chroma", "extra": {"path": str(tmp_path / "chroma")}}),
    )


def test_llm_operator_lineage_is_emitted_with_the_ai_facet(env, monkeypatch, tmp_path):
    with FakeOpenAIServer(
        default=ScriptedReply(content="ok", prompt_tokens=21, completion_tokens=3)
    ) as server:
        monkeypatch.setenv("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", server.connection_json())
        op = LLMOperator(task_id="task", prompt="hello", model="fake-model", prompt_name="greet")
        op.execute(fake_context("lineage_dag", "task"))
        event = emit_and_read(op.get_openlineage_facets_on_complete(None), tmp_path)
    (model,) = event["inputs"]
    assert model["name"] == "fake-model" and model["namespace"].startswith("llm://127.0.0.1:")
    facet = event["run"]["facets"]["governedAi"]
    assert (facet["operation"], facet["promptTokens"], facet["completionTokens"]) == ("chat", 21, 3)
    assert facet["policyRule"] == "lineage" and facet["promptVersion"].startswith("greet#")
    assert facet["_schemaURL"].endswith("GovernedAIRunFacet.json")
    validate_facet(facet)


def test_chroma_lineage_names_files_collection_and_retrieved_ids(env, tmp_path):
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "refunds.md").write_text("Refunds take 14 days.")
    ingest = ChromaIngestOperator(task_id="ingest", collection="kb_lineage", paths=[str(kb)])
    ingest.execute(fake_context("lineage_dag", "ingest"))
    written = emit_and_read(ingest.get_openlineage_facets_on_complete(None), tmp_path)
    assert (written["inputs"][0]["namespace"], written["inputs"][0]["name"]) == ("file", str(kb))
    assert written["outputs"][0]["name"] == "kb_lineage"
    assert written["outputs"][0]["namespace"].startswith("chroma+embedded://")
    assert written["run"]["facets"]["governedAi"]["details"]["new_chunks"] == 1

    query = ChromaQueryOperator(task_id="retrieve", collection="kb_lineage", query="refund")
    result = query.execute(fake_context("lineage_dag", "retrieve"))
    (tmp_path / "lineage.jsonl").unlink()
    read = emit_and_read(query.get_openlineage_facets_on_complete(None), tmp_path)
    assert read["inputs"][0]["name"] == "kb_lineage"
    assert read["run"]["facets"]["governedAi"]["retrievedIds"] == result["ids"]
    validate_facet(read["run"]["facets"]["governedAi"])


def test_without_the_openlineage_provider_lineage_is_nothing(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage.extractors", None)
    op = LLMOperator(task_id="task", prompt="hello", model="fake-model")
    assert op.get_openlineage_facets_on_start() is None
    assert op.get_openlineage_facets_on_complete(None) is None


@pytest.mark.airflow
def test_airflow_emits_the_facets_during_a_dag_run(tmp_path):
    """`airflow dags test` with the OpenLineage file transport: the listener calls our methods."""
    home = tmp_path / "home"
    events = tmp_path / "events.jsonl"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__GOVERNED_AI__POLICY_PATH": str(REPO / "example_dags/policies/governance_policy.yaml"),
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events), "append": True}
        ),
    }
    env.pop("AIRFLOW__GOVERNED_AI__STORE_URL", None)
    env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    run = subprocess.run(
        [airflow, "dags", "test", "kb_ingest", "2026-11-25"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    emitted = [json.loads(line) for line in events.read_text().splitlines()]
    complete = [e for e in emitted if e["eventType"] == "COMPLETE" and e["job"]["name"] == "kb_ingest.ingest"]
    assert complete, [e["job"]["name"] for e in emitted]
    facet = complete[0]["run"]["facets"]["governedAi"]
    assert facet["operation"] == "ingest" and facet["details"]["chunks"] == 5
    assert complete[0]["outputs"][0]["name"] == "kb_support"


def test_batch_lineage_names_the_model_the_input_and_the_results_file(env, monkeypatch, tmp_path):
    from governed_ai.operators.batch import LLMBatchOperator

    items = tmp_path / "tickets.jsonl"
    items.write_text("".join(json.dumps({"id": f"t{i}", "text": f"ticket {i}"}) + "\n" for i in range(3)))
    with FakeOpenAIServer(default=ScriptedReply(content="fine")) as server:
        monkeypatch.setenv("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", server.connection_json())
        op = LLMBatchOperator(
            task_id="task",
            input_path=str(items),
            key_field="id",
            prompt_template="{{ item.text }}",
            model="fake-model",
            output_path=str(tmp_path / "out.jsonl"),
        )
        op.execute(fake_context("lineage_dag", "task"))
    event = emit_and_read(op.get_openlineage_facets_on_complete(None), tmp_path)
    assert [i["name"] for i in event["inputs"]] == ["fake-model", str(items)]
    assert event["outputs"][0]["name"] == str(tmp_path / "out.jsonl")
    facet = event["run"]["facets"]["governedAi"]
    assert facet["operation"] == "batch_chat" and facet["details"]["ok"] == 3
    validate_facet(facet)


def test_lineage_shows_response_cache_hits(governance_policy, monkeypatch, tmp_path):
    from governed_ai.operators.batch import LLMBatchOperator

    governance_policy(
        POLICY.replace(
            "    collections:",
            "    cache: {models: [fake-model], ttl_seconds: 3600, outputs: all}\n    collections:",
        )
    )
    reply = ScriptedReply(content="ok", prompt_tokens=21, completion_tokens=3)
    with FakeOpenAIServer(default=reply) as server:
        monkeypatch.setenv("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", server.connection_json())
        facets = []
        for night in ("night-1", "night-2"):  # two runs: the second is answered from the cache
            single = LLMOperator(task_id="task", prompt="hello", model="fake-model")
            single.execute(fake_context("lineage_dag", "task", run_id=night))
            batch = LLMBatchOperator(
                task_id="batch", items=["a", "b"], prompt_template="{{ item }}", model="fake-model"
            )
            batch.execute(fake_context("lineage_dag", "batch", run_id=night))
            emitted = []
            for op in (single, batch):
                where = tmp_path / night / op.task_id
                where.mkdir(parents=True)
                event = emit_and_read(op.get_openlineage_facets_on_complete(None), where)
                emitted.append(event["run"]["facets"]["governedAi"])
            facets.append(emitted)
        assert len(server.chat_requests) == 3  # one single call and two items, the first night only
    (single_1, batch_1), (single_2, batch_2) = facets
    assert single_1["details"]["cache"] == "miss" and batch_1["details"]["cache_hits"] == 0
    assert single_2["details"]["cache"] == "hit" and single_2["costUsd"] == 0
    assert batch_2["details"]["cache_hits"] == 2 and batch_2["costUsd"] == 0
    for facet in (single_2, batch_2):
        validate_facet(facet)
