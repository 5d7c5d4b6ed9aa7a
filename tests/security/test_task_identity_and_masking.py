"""Real Airflow tasks (``dag.test()``) in two deployment-configured DAG bundles, against a fake model server
that records request bodies:

- a rule that matches a bundle is not widened by a DAG that claims another owner and tags;
- a secret typed into a prompt leaves neither for the model nor into the task log or rendered fields;
- the task's audit records are keyed, anchored at the end of the task (anchor file and task log line) and
  verify.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

# Canaries: a GitHub token, an AWS secret access key written in prose and a password in a URI.
GITHUB_TOKEN = "ghp_" + "Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LmNb12"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DB_PASSWORD = "S3cr3t-Pa55word-77"
CANARIES = (GITHUB_TOKEN, AWS_SECRET, DB_PASSWORD)
PROMPT = (
    f"Rotate the deploy token {GITHUB_TOKEN}; the matching secret is {AWS_SECRET} and the loader "
    f"uses postgres://loader:{DB_PASSWORD}@db.internal/sales. Summarise the risk."
)

POLICY = """\
version: 1
rules:
  - name: privileged
    match: {bundle: "prod-*", owner: data-platform, tags: [privileged]}
    models: [{connection: governed_ai_llm_default, model: big-model}]
  - name: everyone
    models: [{connection: governed_ai_llm_default, model: small-model}]
"""

DAG_TEMPLATE = """\
from airflow.sdk import DAG
from governed_ai.operators.llm import LLMOperator

with DAG({dag_id!r}, schedule=None, tags=["privileged"], default_args={{"owner": "data-platform"}}):
    LLMOperator(task_id="ask", prompt={prompt!r}, model="big-model", max_tokens=20)
"""


def write_bundle(root: Path, name: str, dag_id: str) -> dict[str, Any]:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / f"{dag_id}.py").write_text(DAG_TEMPLATE.format(dag_id=dag_id, prompt=PROMPT))
    return {
        "name": name,
        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
        "kwargs": {"path": str(folder), "refresh_interval": 0},
    }


@pytest.fixture
def deployment(
    airflow_db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    governance_policy: Callable[[str], Path],
) -> Any:
    """Two bundles configured by the deployment: ``prod-core`` and ``user-dags``; each holds a DAG that
    claims owner data-platform and tag privileged."""
    governance_policy(POLICY)
    bundles = [
        write_bundle(tmp_path / "bundles", "prod-core", "prod_summary"),
        write_bundle(tmp_path / "bundles", "user-dags", "claiming_summary"),
    ]
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bundles))
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__AUDIT_ANCHOR_PATH", str(tmp_path / "anchors"))
    with FakeOpenAIServer(models=("big-model", "small-model")) as model:
        model.script(ScriptedReply(content="Rotate both credentials.", prompt_tokens=40, completion_tokens=6))
        monkeypatch.setenv("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", model.connection_json())
        yield model, {b["name"]: Path(b["kwargs"]["path"]) for b in bundles}


def run_dag(folder: Path, dag_id: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    return bag.dags[dag_id].test()


def rendered_fields(dag_id: str, run_id: str) -> str:
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as Rtif
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.scalar(
            select(Rtif.rendered_fields).where(
                Rtif.dag_id == dag_id, Rtif.run_id == run_id, Rtif.task_id == "ask"
            )
        )
    return json.dumps(value)


@pytest.mark.airflow
def test_bundle_identity_secret_masking_and_anchored_audit_in_real_tasks(
    deployment: Any, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from airflow.utils.state import TaskInstanceState

    from governed_ai.hooks.governance import GovernanceHook

    model, folders = deployment
    caplog.set_level("INFO")

    claiming = run_dag(folders["user-dags"], "claiming_summary")
    prod = run_dag(folders["prod-core"], "prod_summary")
    output = capfd.readouterr()
    # What the tasks logged: printed by dag.test(), and every logging record of the task processes.
    task_log = output.out + output.err + caplog.text

    # Identity: same owner and tags claimed by both DAGs; only the deployment's bundle decides.
    (claiming_ti,) = claiming.get_task_instances()
    (prod_ti,) = prod.get_task_instances()
    assert claiming_ti.state == TaskInstanceState.FAILED
    assert prod_ti.state == TaskInstanceState.SUCCESS
    audit = GovernanceHook().governor.audit
    (denial,) = audit.query(dag_id="claiming_summary", decision="deny")
    assert (denial.resource or "").endswith("big-model") and "bundle 'user-dags'" in (denial.error or "")
    (grant,) = audit.query(dag_id="prod_summary", action="model.authorize")
    assert grant.rule == "privileged"

    # The model got the prompt with the secrets redacted (the denied DAG sent nothing at all).
    (request,) = model.chat_requests
    sent = json.dumps(request)
    assert "[REDACTED:SECRET]" in sent
    for canary in CANARIES:
        assert canary not in sent, canary
        assert canary not in rendered_fields("prod_summary", prod.run_id), canary
        assert canary not in task_log, canary
    assert "Rotate the deploy token" in rendered_fields("prod_summary", prod.run_id)  # the rest is kept

    # The audit chain: keyed, anchored when each task ended (file and task log), and it verifies.
    verification = audit.verify()
    assert verification.ok, verification.problem
    assert verification.newest_anchor_seq == verification.head_seq
    assert f"audit chain anchored: seq {verification.head_seq} head {verification.head_hash}" in task_log
