"""The nightly_ticket_labels example DAG, run twice in Airflow (dag.test(), two logical dates): the second
night is answered from the governed response cache and pays for nothing.

Against the fault server (a named fake that counts every completion it serves: the "paid counter") and,
when it is available, the real local model. Both use the example policy, whose ``nightly-ticket-labels``
rule turns the cache on; the governance store is a fresh SQLite file per test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pendulum
import pytest

from tests.fakes.fault_server import FaultConfig, FaultyFakeOpenAIServer

REPO = Path(__file__).resolve().parent.parent
DAG_ID = "nightly_ticket_labels"
FIRST_NIGHT = pendulum.datetime(2026, 3, 1, tz="UTC")
SECOND_NIGHT = pendulum.datetime(2026, 3, 2, tz="UTC")


@pytest.fixture
def nightly_dag(airflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", f"sqlite:///{tmp_path / 'governance.db'}")
    dagbag = DagBag(dag_folder=str(REPO / "example_dags" / "nightly_ticket_labels.py"))
    assert dagbag.import_errors == {}
    return dagbag.dags[DAG_ID]


def tickets() -> list[dict[str, str]]:
    from example_dags.support_common import read_tickets

    return read_tickets()


def outputs(run: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The batch task's XCom and the report task's, for one DAG run."""
    from airflow.utils.state import TaskInstanceState

    states = {ti.task_id: ti for ti in run.get_task_instances()}
    assert {t: ti.state for t, ti in states.items()} == {
        "label_tickets": TaskInstanceState.SUCCESS,
        "report": TaskInstanceState.SUCCESS,
    }
    labels = states["label_tickets"].xcom_pull(task_ids="label_tickets")
    night = states["report"].xcom_pull(task_ids="report")
    return labels, night


def paid(server: FaultyFakeOpenAIServer) -> int:
    """Completions the server served (and would have billed), over every item key."""
    return sum(server.stats()["successes"].values())


def audit_actions(run_id: str) -> list[str]:
    from governed_ai.hooks.governance import GovernanceHook

    records = GovernanceHook().governor.audit.query(dag_id=DAG_ID, run_id=run_id, order="asc", limit=None)
    return [r.action for r in records]


@pytest.mark.airflow
def test_the_second_night_pays_nothing_on_the_servers_counter(nightly_dag, monkeypatch):
    from governed_ai.local_model import CONNECTION_ENV, NOMINAL_PRICE

    with FaultyFakeOpenAIServer(FaultConfig(latency_ms=1, models=("smollm2",))) as server:
        monkeypatch.setenv(
            CONNECTION_ENV,
            server.connection_json(
                default_model="smollm2", structured_output="json_object", prices={"smollm2": NOMINAL_PRICE}
            ),
        )
        first = nightly_dag.test(logical_date=FIRST_NIGHT)
        paid_first_night = paid(server)
        second = nightly_dag.test(logical_date=SECOND_NIGHT)
        paid_second_night = paid(server) - paid_first_night

    count = len(tickets())
    assert paid_first_night == count  # one paid completion per ticket ...
    assert paid_second_night == 0  # ... and none the next night

    labels_1, night_1 = outputs(first)
    labels_2, night_2 = outputs(second)
    assert (night_1["paid_items"], night_1["answered_from_cache"], night_1["cache"]) == (count, 0, "miss")
    assert (night_2["paid_items"], night_2["answered_from_cache"], night_2["cache"]) == (0, count, "hit")
    assert labels_1["cost_usd"] > 0 and labels_2["cost_usd"] == 0 and labels_2["usage"]["total_tokens"] == 0
    assert labels_2["governance"]["cache"] == "hit"
    assert {row["governance"]["cache"] for row in labels_2["results"]} == {"hit"}
    # The same labels, ticket by ticket.
    assert [(r["key"], r["output"]) for r in labels_2["results"]] == [
        (r["key"], r["output"]) for r in labels_1["results"]
    ]

    actions_2 = audit_actions(second.run_id)
    assert actions_2.count("model.cache_hit") == count and "model.call" not in actions_2
    assert "model.authorize" in actions_2  # the policy of the second night was asked
    assert audit_actions(first.run_id).count("model.call") == count


@pytest.mark.airflow
@pytest.mark.real_model
def test_the_second_night_on_the_real_model_is_answered_from_the_cache(nightly_dag, local_model_connection):
    first = nightly_dag.test(logical_date=FIRST_NIGHT)
    second = nightly_dag.test(logical_date=SECOND_NIGHT)
    labels_1, night_1 = outputs(first)
    labels_2, night_2 = outputs(second)
    answered = labels_1["summary"]["ok"]
    assert answered >= len(tickets()) - 2  # max_failure_rate 0.25 tolerates two
    assert night_1["paid_items"] == answered and night_2["answered_from_cache"] == answered
    # Only a ticket the first night could not label is paid for again.
    assert night_2["paid_items"] <= len(tickets()) - answered
    if answered == len(tickets()):
        assert labels_2["cost_usd"] == 0 and labels_2["governance"]["cache"] == "hit"
    first_outputs = {r["key"]: r["output"] for r in labels_1["results"] if r["status"] == "ok"}
    cached = {
        r["key"]: r["output"] for r in labels_2["results"] if r.get("governance", {}).get("cache") == "hit"
    }
    assert json.dumps(cached, sort_keys=True) == json.dumps(first_outputs, sort_keys=True)
    actions_2 = audit_actions(second.run_id)
    assert actions_2.count("model.cache_hit") == answered
