"""Canary secrets and PII planted everywhere a DAG can put them, searched for everywhere they could end up.

One real DAG run (``dag.test()``) of every kind of governed task (single call, two batches, an agent with a
tool, the tool alone, ingest of documents and files into Chroma, a query, a purge), against the
fault-injecting fake model server recording every request body, with Chroma embedding through that server.

Planted: an AWS access key id and secret key (assigned, ``aws_secret_access_key = ...``, and a second one
in prose, "the matching secret is ..."), an OpenAI project key, a GitHub token, a JWT, a private-key block,
a password in a URI, an e-mail address, a phone number, an IBAN and a card number; in prompts and system
prompts, batch items and their keys, ingested files, file names, document sources and metadata, the
ingest's own metadata, a tool's result, query text and agent context.

Searched: the request bodies the server received, every table (and the raw file) of the governance store,
Chroma's persisted directory, XCom, Airflow's rendered template fields, the task logs and the output
files. ``dag.test()`` runs the tasks in this process and writes their logs to stdout and to logging
records rather than to files under ``$AIRFLOW_HOME/logs``: both are captured and searched (and the log
folder too, should a version write files there).

No secret may appear anywhere; personal data only where the policy allows it: this policy lets batch item
keys show personal data (``output_item_keys: allow_pii``) except in the ``batch_strict`` task,
so the e-mail and phone keys may appear in ``batch_pii_ok``'s results file, and nowhere else.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.core.test_redaction_canaries import (
    AWS_KEY_ID,
    AWS_SECRET,
    CARD,
    DB_PASSWORD,
    EMAIL,
    GITHUB_TOKEN,
    IBAN,
    JWT,
    OPENAI_KEY,
    PHONE,
    PRIVATE_KEY,
)
from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer

DAG_ID = "canary_pipeline"
# A second AWS-style secret, only ever written in prose (the first is also written as an assignment, and
# once the redactor knows a value it is masked everywhere: the prose form must be caught on its own).
AWS_SECRET_PROSE = "q7Vt2Lw9Xr4Kp1Zm8Nc3Hb6Jd0Fs5Gy/Ue+Ta2Ri"
ALL_CANARIES = (
    f"Customer {EMAIL}, phone {PHONE}, IBAN {IBAN}, card {CARD}.\n"
    f"aws_access_key_id = {AWS_KEY_ID}\naws_secret_access_key = {AWS_SECRET}\n"
    f"For the loader, the matching secret is {AWS_SECRET_PROSE} (rotate it).\n"
    f"OpenAI key {OPENAI_KEY}, GitHub token {GITHUB_TOKEN}, session {JWT}.\n"
    f"Database: postgres://loader:{DB_PASSWORD}@db.internal/sales\n{PRIVATE_KEY}\n"
)
SECRETS = {
    "aws key id": AWS_KEY_ID,
    "aws secret (assigned)": AWS_SECRET,
    "aws secret (prose)": AWS_SECRET_PROSE,
    "openai key": OPENAI_KEY,
    "github token": GITHUB_TOKEN,
    "jwt": JWT,
    "private key": PRIVATE_KEY.splitlines()[1],  # a line of the block: JSON and logs escape the newlines
    "uri password": DB_PASSWORD,
}
PERSONAL_DATA = {
    "e-mail": (EMAIL,),
    "phone": (PHONE, PHONE.replace(" ", "")),
    "iban": (IBAN, IBAN.replace(" ", "")),
    "card": (CARD, CARD.replace(" ", "")),
}
# Where the policy lets personal data appear: batch item keys in batch_pii_ok's own outputs.
PII_ALLOWED = {"output file batch_pii_ok.jsonl": {"e-mail", "phone"}}

POLICY = """\
version: 1
defaults:
  store_content: true               # the audit trail keeps (redacted) prompts and replies: searched too
  output_item_keys: allow_pii       # batch item keys may show personal data in the task's own outputs ...
rules:
  - name: canary
    match: {dag_id: canary_pipeline}
    models:
      - {connection: governed_ai_llm_default, model: fake-model, max_tokens_per_call: 64}
      - {connection: governed_ai_llm_default, model: fake-embed}
    tools: [{name: lookup_customer}]
    collections: [{name: canary_kb, read: true, write: true}]
  - name: strict-keys
    match: {dag_id: canary_pipeline, task_id: batch_strict}
    redaction: {output_item_keys: redacted}   # ... except in this task
budgets:
  - {name: canary-run, scope: dag, match: {dag_id: canary_pipeline}, period: run, max_tokens: 200000,
     max_cost_usd: 5}
"""

DAG_FILE = """
import json

from airflow.sdk import DAG
from pydantic import BaseModel, Field

from governed_ai.core.tools import ToolRegistry, tool
from governed_ai.operators.agent import AgentOperator
from governed_ai.operators.batch import LLMBatchOperator
from governed_ai.operators.chroma import ChromaIngestOperator, ChromaPurgeOperator, ChromaQueryOperator
from governed_ai.operators.llm import LLMOperator
from governed_ai.operators.tool import ToolOperator

C = json.loads({canaries!r})
ALL = C["all"]
TOOLS = ToolRegistry(name="canaries")


class Lookup(BaseModel):
    customer: str = Field(max_length=40)


@tool(registry=TOOLS, description="Look a customer up by name.")
def lookup_customer(args: Lookup) -> dict:
    return {{"customer": args.customer, "contact": C["email"], "notes": ALL}}


def items(keys):
    return [{{"id": key, "text": ALL}} for key in keys]


with DAG({dag_id!r}, schedule=None, default_args={{"retries": 0}}):
    ingest = ChromaIngestOperator(
        task_id="ingest", collection="canary_kb", paths=[{files!r}],
        documents=[{{"text": ALL, "source": "mail from " + C["email"],
                    "metadata": {{"card": C["card"], "key": C["openai"]}}}}],
        metadata={{"contact": C["email"], "token": C["github"]}},
    )
    query = ChromaQueryOperator(task_id="query", collection="canary_kb", query=ALL, n_results=3)
    purge = ChromaPurgeOperator(
        task_id="purge", collection="canary_kb", sources=["ticket-" + C["email"] + ".md"]
    )
    ask = LLMOperator(task_id="ask", prompt=ALL, system_prompt="Answer " + C["email"], model="fake-model")
    strict = LLMBatchOperator(
        task_id="batch_strict", items=items([C["email"], C["aws_key_id"], "T-3"]), key_field="id",
        prompt_template="Ticket: {{{{ item.text }}}}", model="fake-model", max_tokens=16,
    )
    pii_ok = LLMBatchOperator(
        task_id="batch_pii_ok", items=items([C["email"], C["phone"], C["aws_key_id"]]), key_field="id",
        prompt_template="Ticket: {{{{ item.text }}}}", model="fake-model", max_tokens=16,
        output_path={output!r},
    )
    agent = AgentOperator(
        task_id="agent", prompt="Who is the customer? " + ALL, context=[ALL], tools=["lookup_customer"],
        registry=TOOLS, require_tool_call=True, max_steps=2, model="fake-model", max_tokens=64,
    )
    lookup = ToolOperator(
        task_id="lookup", tool="lookup_customer", registry=TOOLS, arguments={{"customer": C["email"]}}
    )
    ingest >> query >> purge
"""


@dataclass
class Deployment:
    server: FaultyFakeOpenAIServer
    dags: Path
    store: Path
    chroma: Path
    outputs: Path


@pytest.fixture
def deployment(
    airflow_db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    governance_policy: Callable[[str], Path],
) -> Iterator[Deployment]:
    governance_policy(POLICY)
    files = tmp_path / "incoming"
    files.mkdir()
    (files / f"ticket-{EMAIL}.md").write_text(f"# Ticket\n\n{ALL_CANARIES}")  # a file named after a customer
    (files / f"scan-{EMAIL}.pdf").write_bytes(b"%PDF-1.4 not text")  # skipped, but its name is data too
    outputs = tmp_path / "outputs"
    canaries = {
        "all": ALL_CANARIES, "email": EMAIL, "card": CARD, "openai": OPENAI_KEY, "github": GITHUB_TOKEN,
        "aws_key_id": AWS_KEY_ID, "phone": PHONE,
    }  # fmt: skip
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / f"{DAG_ID}.py").write_text(
        DAG_FILE.format(
            canaries=json.dumps(canaries),
            dag_id=DAG_ID,
            files=str(files),
            output=str(outputs / "batch_pii_ok.jsonl"),
        )
    )
    bundle = {
        "name": "canary-tests",
        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
        "kwargs": {"path": str(dags), "refresh_interval": 0},
    }
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([bundle]))
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__AUDIT_ANCHOR_PATH", str(tmp_path / "anchors"))
    chroma = tmp_path / "chroma"
    config = FaultConfig(latency_ms=1, models=("fake-model", "fake-embed"), record_bodies=True)
    with FaultyFakeOpenAIServer(config) as server:
        price = {"input_per_1m_tokens": 0.5, "output_per_1m_tokens": 1.5}
        monkeypatch.setenv(
            "AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT",
            server.connection_json(default_model="fake-model", prices={"fake-*": price}, max_retries=0),
        )
        monkeypatch.setenv(
            "AIRFLOW_CONN_GOVERNED_AI_CHROMA_DEFAULT",
            json.dumps(
                {
                    "conn_type": "governed_ai_chroma",
                    "extra": {"path": str(chroma), "embedding": "openai", "embedding_model": "fake-embed"},
                }
            ),
        )
        yield Deployment(server, dags, tmp_path / "governance.db", chroma, outputs)


# -- where to look ------------------------------------------------------------------------------------------


def governance_store(path: Path) -> list[tuple[str, str]]:
    """Every row of every table, and the raw database file (freed pages included)."""
    found = []
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            rows = db.execute(f'SELECT * FROM "{table}"').fetchall()  # names from sqlite_master
            found.append((f"governance store table {table}", json.dumps(rows, default=str)))
    assert {"audit_log", "budget_ledger"} & set(tables) or len(tables) > 3, tables
    for file in path.parent.glob(path.name + "*"):
        found.append((f"governance store file {file.name}", file.read_bytes().decode("utf-8", "replace")))
    return found


def directory(label: str, root: Path) -> list[tuple[str, str]]:
    return [
        (f"{label} {file.relative_to(root)}", file.read_bytes().decode("utf-8", "replace"))
        for file in sorted(root.rglob("*"))
        if file.is_file()
    ]


def airflow_rows(run_id: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """XCom values and rendered template fields of the run, per task."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as Rtif
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        xcoms = session.execute(
            select(XComModel.task_id, XComModel.key, XComModel.value).where(
                XComModel.dag_id == DAG_ID, XComModel.run_id == run_id
            )
        ).all()
        rendered = session.execute(
            select(Rtif.task_id, Rtif.rendered_fields).where(Rtif.dag_id == DAG_ID, Rtif.run_id == run_id)
        ).all()
    return (
        [(f"xcom {task} {key}", json.dumps(value, default=str)) for task, key, value in xcoms],
        [(f"rendered fields {task}", json.dumps(fields, default=str)) for task, fields in rendered],
    )


def leaks(places: list[tuple[str, str]]) -> list[str]:
    found = []
    for place, text in places:
        for label, secret in SECRETS.items():
            middle = secret[len(secret) // 3 : 2 * len(secret) // 3]  # a recognisable piece leaks too
            if secret in text or middle in text:
                found.append(f"{label} in {place}")
        for label, forms in PERSONAL_DATA.items():
            if any(form in text for form in forms) and label not in PII_ALLOWED.get(place, set()):
                found.append(f"{label} in {place}")
    return found


# -- the run ----------------------------------------------------------------------------------------------


def task_log_files() -> list[tuple[str, str]]:
    from airflow.configuration import conf

    root = Path(conf.get("logging", "base_log_folder")) / f"dag_id={DAG_ID}"
    return directory("task log file", root) if root.exists() else []


@pytest.mark.airflow
def test_no_canary_leaks_from_a_real_run_of_every_governed_task(
    deployment: Deployment, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import TaskInstanceState

    caplog.set_level("INFO")
    bag = DagBag(dag_folder=str(deployment.dags))
    assert bag.import_errors == {}
    run = bag.dags[DAG_ID].test()
    printed = capfd.readouterr()
    task_log = printed.out + printed.err + caplog.text

    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert set(states.values()) == {TaskInstanceState.SUCCESS}, states
    bodies = deployment.server.request_bodies()
    xcom_places, rendered_places = airflow_rows(run.run_id)
    outputs = [(f"output file {p.name}", p.read_text()) for p in sorted(deployment.outputs.glob("*.jsonl"))]
    places = [
        *[(f"request body {path}", body) for path, body in bodies],
        *governance_store(deployment.store),
        *directory("chroma", deployment.chroma),
        *xcom_places,
        *rendered_places,
        ("task log (printed)", printed.out + printed.err),
        ("task log (log records)", caplog.text),
        *task_log_files(),
        *outputs,
    ]

    found = leaks(places)
    assert found == [], "\n".join(found)

    # The places searched really hold the (redacted) data, so the search above could have found it.
    sent = "\n".join(body for _, body in bodies)
    for kind in ("SECRET", "EMAIL", "PHONE", "IBAN", "PAYMENT_CARD"):
        assert f"[REDACTED:{kind}]" in sent, kind
    assert {path.rsplit("/", 1)[-1] for path, _ in bodies} == {"completions", "embeddings"}
    tool_results_sent = [body for _, body in bodies if "lookup_customer" in body and "notes" in body]
    assert tool_results_sent, "the agent's tool result never reached the model"
    chroma = "\n".join(text for _, text in directory("chroma", deployment.chroma))
    assert "[REDACTED:SECRET]" in chroma and "[REDACTED:EMAIL]" in chroma
    assert {place.rsplit(" ", 1)[-1] for place, _ in rendered_places} >= {"ask", "batch_strict", "query"}
    assert "Batch of 3 items" in task_log

    # Item keys: raw where the policy allows personal data, digests where it does not; secrets never.
    pii_ok = [json.loads(line) for line in dict(outputs)["output file batch_pii_ok.jsonl"].splitlines()]
    assert [row["key"] for row in pii_ok][:2] == [EMAIL, PHONE] and pii_ok[2]["key"].startswith("digest:")
    strict = json.loads(dict(xcom_places)["xcom batch_strict return_value"])
    assert [row["key"][:7] for row in strict["results"]] == ["digest:", "digest:", "T-3"]

    # The purge found the chunks of the file named after the customer by its real name.
    assert json.loads(dict(xcom_places)["xcom purge return_value"])["deleted"] >= 1
