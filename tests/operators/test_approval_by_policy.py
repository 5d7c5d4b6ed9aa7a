"""Approval by policy through Airflow's own human-in-the-loop: ``dag.test()`` runs the example DAG
``approval_by_policy`` while this test answers through Airflow's REST API.

Real parts: the DAG from ``example_dags`` with the example policy, ``dag.test()`` (on Airflow 3.3 it keeps a
run alive while a task waits in ``awaiting_input``, until a response recorded through the API, which shares
the metadata database, resumes it), Airflow's FastAPI app (``/api/v2/.../hitlDetails``, with JWTs its auth
manager issues and checks, including the assigned-users check), the governance store and its audit trail.
The model endpoint is the FaultyFakeOpenAIServer, a named fake whose paid counter shows what was served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from governed_ai.local_model import NOMINAL_PRICE
from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer

DAG_ID = "approval_by_policy"
TASK_ID = "draft_refund_reply"
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.airflow


@dataclass
class Api:
    """Airflow's REST API app in this process (a real FastAPI app over the test's metadata database)."""

    client: Any

    def token_for(self, username: str) -> str:
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

        return str(get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role="admin")))

    def call(self, method: str, path: str, user: str = "admin", body: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token_for(user)}"}
        return self.client.request(method, path, headers=headers, json=body)

    def pending_request(self, timeout_s: float = 300) -> dict[str, Any]:
        """The open HITL request of the DAG's task, once the task has written it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            path = f"/api/v2/dags/{DAG_ID}/dagRuns/~/hitlDetails?response_received=false"
            response = self.call("GET", path)
            if response.status_code == 200:
                details = response.json()["hitl_details"]
                if details:
                    return dict(details[0])
            time.sleep(0.5)
        raise AssertionError("the task never asked for approval")

    def answer(self, run_id: str, option: str, user: str = "admin") -> Any:
        path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{TASK_ID}/-1/hitlDetails"
        return self.call("PATCH", path, user, {"chosen_options": [option], "params_input": {}})


@pytest.fixture
def api(airflow_db: Path) -> Iterator[Api]:
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    with TestClient(create_app("core")) as client:
        yield Api(client)


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FaultyFakeOpenAIServer]:
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", f"sqlite:///{tmp_path / 'governance.db'}")
    with FaultyFakeOpenAIServer(FaultConfig(latency_ms=1, models=("smollm2",))) as server:
        # Priced as the local model's connection is (the example policy has cost budgets for this owner).
        prices = {"smollm2": dict(NOMINAL_PRICE)}
        monkeypatch.setenv("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", server.connection_json(prices=prices))
        yield server


def answer_in_background(api: Api, option: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Answer the task's request from another thread: ``dag.test()`` must own the main thread (signals)."""
    seen: dict[str, Any] = {}

    def target() -> None:
        try:
            seen["request"] = request = api.pending_request()
            run_id = request["task_instance"]["dag_run_id"]
            seen["paid_before_answer"] = seen["paid"]()
            seen["stranger"] = api.answer(run_id, option, user="mallory").status_code
            response = api.answer(run_id, option)
            seen["answer"] = (response.status_code, response.text)
        except BaseException as error:  # reported by the test, not lost in the thread
            seen["error"] = error
            # dag.test() waits for an answer for ever: reject whatever is pending so the test can end.
            request = seen.get("request") or api.pending_request(timeout_s=5)
            api.answer(request["task_instance"]["dag_run_id"], "Reject")

    thread = threading.Thread(target=target, name="approver", daemon=True)
    return thread, seen


def audit(action: str) -> list[Any]:
    from governed_ai.hooks.governance import GovernanceHook

    return GovernanceHook().governor.audit.query(dag_id=DAG_ID, action=action, order="asc", limit=None)


def paid(server: FaultyFakeOpenAIServer) -> int:
    return sum(server.stats()["successes"].values())


@pytest.fixture
def dag(airflow_db: Path) -> Any:
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1 (this file also runs there by hand: see the module docstring)
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]

    bag = DagBag(dag_folder=str(REPO / "example_dags" / "approval_by_policy.py"))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def test_approved_through_the_rest_api_the_call_runs_once_and_the_approver_is_audited(dag, api, fake_model):
    from airflow.utils.state import DagRunState

    approver, seen = answer_in_background(api, "Approve")
    seen["paid"] = lambda: paid(fake_model)
    approver.start()
    run = dag.test()
    approver.join(timeout=30)
    assert "error" not in seen, seen
    request = seen["request"]
    # What the approver reads: the model, the rule, the approvers; never the prompt.
    assert "smollm2" in request["subject"] and "approval-by-policy" in request["body"]
    assert "EUR 40" not in request["subject"] + request["body"]
    assert [u["id"] for u in request["assigned_users"]] == ["admin"]
    assert seen["paid_before_answer"] == 0  # asked before anything was paid
    # Someone the policy does not name cannot answer: Airflow refuses them (assigned users).
    assert seen["stranger"] == 403
    assert seen["answer"][0] == 200, seen["answer"]

    assert run.state == DagRunState.SUCCESS
    assert paid(fake_model) == 1
    run_id = run.run_id
    (requested,) = [r for r in audit("approval.requested") if r.run_id == run_id]
    (granted,) = [r for r in audit("approval.granted") if r.run_id == run_id]
    assert (granted.decision, granted.extra["approver"], granted.resource) == (
        "allow", "admin", "governed_ai_llm_default/smollm2",
    )  # fmt: skip
    assert requested.seq < granted.seq
    (call,) = [r for r in audit("model.call") if r.run_id == run_id]
    assert call.outcome == "ok" and call.seq > granted.seq


def test_rejected_through_the_rest_api_the_task_fails_with_nothing_paid(dag, api, fake_model):
    from airflow.utils.state import DagRunState, TaskInstanceState

    approver, seen = answer_in_background(api, "Reject")
    seen["paid"] = lambda: paid(fake_model)
    approver.start()
    run = dag.test()
    approver.join(timeout=30)
    assert "error" not in seen and seen["answer"][0] == 200, seen

    assert run.state == DagRunState.FAILED
    (ti,) = run.get_task_instances()
    # A rejection is a clean, permanent denial: no retry was tried although the DAG allows one.
    assert ti.state == TaskInstanceState.FAILED and ti.try_number == 1
    assert paid(fake_model) == 0
    run_id = run.run_id
    (rejected,) = [r for r in audit("approval.rejected") if r.run_id == run_id]
    assert (rejected.decision, rejected.outcome, rejected.extra["approver"]) == ("deny", "rejected", "admin")
    assert [r for r in audit("model.call") if r.run_id == run_id] == []
