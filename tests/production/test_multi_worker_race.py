"""Two worker processes racing on one budget and one collection, with production backends.

Governance state on a real PostgreSQL server and Chroma as a ``chroma run`` server, both started by the
test; the model is the named FakeOpenAIServer (fixed usage per call, so totals are exact).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from governed_ai.core.audit import AuditStore
from governed_ai.core.audit_anchors import AnchorLog
from governed_ai.core.keys import DeploymentKey, generate_key_text
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.sqlstore import create_store_engine
from tests.chroma_server import start_chroma_server
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply
from tests.pg_server import start_postgres

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 900
POLICY = f"""
version: 1
rules:
  - name: race
    match: {{dag_id: race_dag}}
    models: [{{connection: governed_ai_llm_default, model: fake-model}}]
    collections: [{{name: "kb_*", read: true, write: true}}]
budgets:
  - name: race-daily
    scope: dag
    match: {{dag_id: race_dag}}
    period: day
    max_tokens: {MAX_TOKENS}
"""


@pytest.mark.postgres
def test_two_workers_never_overspend_or_duplicate(tmp_path):
    postgres = start_postgres()
    chroma = start_chroma_server()
    try:
        store_url = postgres.create_database("race")
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        # A multi-worker deployment shares one audit key and one anchor location (configured, not a key
        # file per machine).
        audit_key = generate_key_text()
        anchor_dir = tmp_path / "anchors"
        with FakeOpenAIServer(
            default=ScriptedReply(content="ok", prompt_tokens=10, completion_tokens=5)
        ) as llm:
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
                "AIRFLOW__GOVERNED_AI__POLICY_PATH": str(policy),
                "AIRFLOW__GOVERNED_AI__STORE_URL": store_url,
                "AIRFLOW__GOVERNED_AI__AUDIT_HMAC_KEY": audit_key,
                "AIRFLOW__GOVERNED_AI__AUDIT_ANCHOR_PATH": str(anchor_dir),
                "AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT": llm.connection_json(),
                "AIRFLOW_CONN_GOVERNED_AI_CHROMA_DEFAULT": chroma.connection_json(),
            }
            start_at = time.time() + 8  # both import Airflow first, then start together
            workers = [
                subprocess.Popen(
                    [sys.executable, "-m", "tests.production.race_worker", name, str(start_at)],
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for name in ("worker-a", "worker-b")
            ]
            outputs = []
            for worker in workers:
                out, err = worker.communicate(timeout=300)
                assert worker.returncode == 0, err[-3000:]
                outputs.append(json.loads(out.strip().splitlines()[-1]))
            served = len(llm.chat_requests)
        engine = create_store_engine(store_url)
        (status,) = BudgetLedger(engine).status()
        calls = sum(o["calls"] for o in outputs)
        # No overspend, and every token spent is accounted to a call the server really answered.
        assert status.spent_tokens <= MAX_TOKENS
        assert status.spent_tokens == sum(o["tokens"] for o in outputs) == calls * 15
        assert served == calls
        assert status.reserved_tokens == 0
        assert all(o["denied"] and "Budget exhausted" in o["denied"] for o in outputs)
        assert min(o["calls"] for o in outputs) > 0, outputs  # both really raced for the budget
        # One collection, written by both: each chunk exactly once.
        import chromadb

        client = chromadb.HttpClient(host=chroma.host, port=chroma.port)
        assert client.get_collection("kb_race").count() == 40
        assert sorted(o["ingest"]["new_chunks"] for o in outputs)[1] <= 40
        audit = AuditStore(
            engine, key=DeploymentKey.from_text(audit_key, source="test"), anchors=AnchorLog(anchor_dir)
        )
        verification = audit.verify()
        assert verification.ok, verification.problem
        assert verification.anchors_checked >= 2  # each worker anchored its writes
        assert len(audit.query(action="model.call", limit=None)) == calls
        engine.dispose()
    finally:
        chroma.stop()
        postgres.stop()
