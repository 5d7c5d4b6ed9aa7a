"""Approval by policy on a running Airflow: ``airflow standalone`` (scheduler, LocalExecutor workers,
api-server) runs the example DAG ``approval_by_policy``; this test answers through the REST API as a user.

Two runs: one approved (the task resumes, makes its one model call and succeeds), one rejected (the task
fails at once, without the retry its DAG allows, and nothing is sent). Between trigger and answer the task
waits in Airflow's human-in-the-loop state, holding no worker slot. The governance store is then read from
the provider's home: the audit chain verifies and holds who approved and who rejected.

The model endpoint is the FaultyFakeOpenAIServer (a named fake, served from this process), so its paid
counter says exactly what the workers sent.
"""

from __future__ import annotations

import json
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from governed_ai.local_model import CONNECTION_ENV, NOMINAL_PRICE
from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer
from tests.production.standalone import Standalone, start_standalone
from tests.production.test_standalone_e2e import trigger, wait_for_dags, wait_for_run

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "approval_by_policy"
TASK_ID = "draft_refund_reply"

pytestmark = pytest.mark.standalone


@pytest.fixture(scope="module")
def fake_model() -> Iterator[FaultyFakeOpenAIServer]:
    with FaultyFakeOpenAIServer(FaultConfig(latency_ms=1, models=("smollm2",))) as server:
        yield server


@pytest.fixture(scope="module")
def airflow(
    fake_model: FaultyFakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Standalone]:
    home = tmp_path_factory.mktemp("standalone-approval")
    server = start_standalone(
        home,
        {
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "example_dags"),
            "AIRFLOW__GOVERNED_AI__POLICY_PATH": str(REPO / "example_dags/policies/governance_policy.yaml"),
            CONNECTION_ENV: fake_model.connection_json(prices={"smollm2": dict(NOMINAL_PRICE)}),
        },
    )
    try:
        yield server
    finally:
        server.stop()
    assert server.process.poll() is not None, "standalone is still running after stop()"


def hitl_path(run_id: str) -> str:
    return f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{TASK_ID}/-1/hitlDetails"


def wait_for_request(server: Standalone, run_id: str, timeout_s: float = 180) -> dict[str, Any]:
    """The task's approval request, once the task has written it and is waiting."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            detail = server.request("GET", hitl_path(run_id))
            ti = server.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{TASK_ID}")
            if detail and ti["state"] in ("awaiting_input", "deferred"):
                # Answer like a person, not within the same second: Airflow 3.3.2 races an answer that
                # arrives before the scheduler has processed the parked workload's exit (it then marks
                # the resumed try up_for_retry: "finished with state success, but ... state is queued").
                time.sleep(10)
                return {**detail, "state": ti["state"]}
        except urllib.error.HTTPError as error:
            if error.code != 404:  # 404 until the task has asked
                raise
        time.sleep(2)
    raise AssertionError(f"{DAG_ID} {run_id} never asked for approval\n{server.log_tail()}")


def answer(server: Standalone, run_id: str, option: str) -> Any:
    return server.request("PATCH", hitl_path(run_id), {"chosen_options": [option], "params_input": {}})


def audit_trail(server: Standalone) -> Any:
    from governed_ai.core.audit import AuditStore
    from governed_ai.core.audit_anchors import AnchorLog
    from governed_ai.core.keys import read_key_file
    from governed_ai.core.sqlstore import create_store_engine

    provider_home = server.home / "governed_ai"
    engine = create_store_engine(f"sqlite:///{provider_home / 'governance.db'}")
    store = AuditStore(
        engine, key=read_key_file(provider_home / "audit.key"), anchors=AnchorLog(provider_home / "anchors")
    )
    return store, engine


def test_approve_and_reject_through_the_rest_api_on_a_running_airflow(
    airflow: Standalone, fake_model: FaultyFakeOpenAIServer
) -> None:
    wait_for_dags(airflow, [DAG_ID])
    approved_run = trigger(airflow, DAG_ID)
    request = wait_for_request(airflow, approved_run)
    # Waiting for a person holds no worker slot: parked (3.3) or deferred (3.1/3.2), never running.
    assert request["state"] in ("awaiting_input", "deferred")
    assert [u["id"] for u in request["assigned_users"]] == ["admin"]
    assert "smollm2" in request["subject"] and "EUR 40" not in request["body"]
    assert sum(fake_model.stats()["successes"].values()) == 0  # nothing sent before the answer
    responded = answer(airflow, approved_run, "Approve")
    assert responded["responded_by"]["id"] == "admin"
    assert wait_for_run(airflow, DAG_ID, approved_run) == "success"
    assert sum(fake_model.stats()["successes"].values()) == 1

    rejected_run = trigger(airflow, DAG_ID)
    wait_for_request(airflow, rejected_run)
    answer(airflow, rejected_run, "Reject")
    assert wait_for_run(airflow, DAG_ID, rejected_run) == "failed"
    ti = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{rejected_run}/taskInstances/{TASK_ID}")
    assert (ti["state"], ti["try_number"]) == ("failed", 1)  # a denial is final: no retry
    assert sum(fake_model.stats()["successes"].values()) == 1  # the rejected run sent nothing

    store, engine = audit_trail(airflow)
    try:
        verification = store.verify()
        assert verification.ok, verification.problem
        records = store.query(dag_id=DAG_ID, order="asc", limit=None)
        summary = [(r.run_id, r.action, r.decision, r.extra.get("approver")) for r in records
                   if r.action.startswith("approval.") or r.action == "model.call"]  # fmt: skip
        assert summary == [
            (approved_run, "approval.requested", "n/a", None),
            (approved_run, "approval.granted", "allow", "admin"),
            (approved_run, "model.call", "allow", None),
            (rejected_run, "approval.requested", "n/a", None),
            (rejected_run, "approval.rejected", "deny", "admin"),
        ], json.dumps(summary, indent=1)
    finally:
        engine.dispose()
