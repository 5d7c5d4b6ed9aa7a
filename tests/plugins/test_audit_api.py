"""The plugin's API over a real governance store, behind Airflow's real auth manager and permission checks.

The store is filled through the real Governor; tokens come from Airflow's configured auth manager
(SimpleAuthManager), as in Airflow's own API tests: no token -> 401, an invalid token or a user without
the permission -> 403. Expected values are read back from the store and the ledger, not typed in.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import update

from governed_ai.core.audit import audit_table

ROUTES = [
    "/",
    "/static/audit.js",
    "/static/audit.css",
    "/api/runs",
    "/api/records",
    "/api/spend",
    "/api/budgets",
    "/api/verify",
    "/api/options",
]


# -- access ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_needs_a_token(make_client, filled_store, route):
    response = make_client(filled_store.url, role=None).get(route)

    assert response.status_code == 401
    assert response.json()["detail"] == "Not authenticated"


@pytest.mark.parametrize("route", ["/", "/api/runs", "/api/verify"])
def test_an_invalid_token_is_forbidden(make_client, filled_store, route):
    from fastapi.testclient import TestClient

    client = make_client(filled_store.url, role=None)
    response = TestClient(client.app, headers={"Authorization": "Bearer not-a-jwt"}).get(route)

    assert response.status_code == 403


@pytest.mark.parametrize("route", ["/", "/api/runs", "/api/records?dag_id=api_a", "/api/budgets"])
def test_a_user_without_the_read_permission_is_forbidden(make_client, filled_store, route):
    response = make_client(filled_store.url, role="no_role").get(route)

    assert response.status_code == 403
    assert response.json()["detail"] == "Forbidden"


@pytest.mark.parametrize("role", ["viewer", "admin"])
def test_reading_needs_no_more_than_the_read_permission(make_client, filled_store, role):
    response = make_client(filled_store.url, role=role).get("/api/runs")

    assert response.status_code == 200
    assert response.json()["totals"]["records"] == len(filled_store.audit.query(limit=None))


def test_the_page_authenticates_with_the_ui_session_cookie(make_client, filled_store):
    client = make_client(filled_store.url, role="viewer", via_cookie=True)

    page = client.get("/?dag_id=api_a&run_id=run-1")
    data = client.get("/api/records", params={"dag_id": "api_a"})

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert data.status_code == 200
    assert data.json()["total"] == len(filled_store.audit.query(dag_id="api_a", limit=None))


def test_the_permission_is_checked_for_the_dag_in_the_query(make_client, filled_store, monkeypatch):
    """The route asks Airflow's auth manager about the audit log of the DAG being filtered on, and about
    all DAGs when there is no DAG filter."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity

    asked: list[tuple[str, Any, str | None]] = []

    def only_api_a(*, method, user, access_entity=None, details=None):
        dag_id = None if details is None else details.id
        asked.append((method, access_entity, dag_id))
        return dag_id == "api_a"

    monkeypatch.setattr(get_auth_manager(), "is_authorized_dag", only_api_a)
    client = make_client(filled_store.url, role="viewer")

    allowed = client.get("/api/records", params={"dag_id": "api_a"})
    other_dag = client.get("/api/records", params={"dag_id": "api_b"})
    all_dags = client.get("/api/records")

    assert allowed.status_code == 200
    assert {r["dag_id"] for r in allowed.json()["records"]} == {"api_a"}
    assert (other_dag.status_code, all_dags.status_code) == (403, 403)
    assert asked == [
        ("GET", DagAccessEntity.AUDIT_LOG, "api_a"),
        ("GET", DagAccessEntity.AUDIT_LOG, "api_b"),
        ("GET", DagAccessEntity.AUDIT_LOG, None),
    ]


@pytest.mark.parametrize("route", ["/api/budgets", "/api/verify"])
def test_data_spanning_dags_cannot_be_read_with_one_dags_permission(
    make_client, filled_store, monkeypatch, route
):
    from airflow.api_fastapi.app import get_auth_manager

    def only_api_a(*, method, user, access_entity=None, details=None):
        return details is not None and details.id == "api_a"

    monkeypatch.setattr(get_auth_manager(), "is_authorized_dag", only_api_a)
    client = make_client(filled_store.url, role="viewer")

    smuggled = client.get(route, params={"dag_id": "api_a"})
    plain = client.get(route)

    assert smuggled.status_code == 422 and "is not per DAG" in smuggled.json()["detail"]
    assert plain.status_code == 403


# -- data --------------------------------------------------------------------------------------------------


def test_runs_report_calls_denials_with_rules_tokens_cost_and_latency(make_client, filled_store):
    records = filled_store.audit.query(dag_id="api_a", run_id="run-1", limit=None)
    calls = [r for r in records if r.action == "model.call"]
    denials = Counter((r.action, r.rule) for r in records if r.decision == "deny")

    body = make_client(filled_store.url).get("/api/runs", params={"dag_id": "api_a"}).json()

    (run,) = body["runs"]
    assert (run["dag_id"], run["run_id"]) == ("api_a", "run-1")
    assert run["model_calls"] == len(calls)
    assert run["denials"] == sum(denials.values())
    assert Counter({(d["action"], d["rule"]): d["count"] for d in run["denied_by"]}) == denials
    assert ("budget.deny", "api-per-run") in denials  # the scenario has the budget stop the page must show
    assert run["total_tokens"] == sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in records)
    assert run["cost_usd"] == pytest.approx(sum(r.cost_usd or 0.0 for r in records))
    assert run["latency_ms_p50"] == pytest.approx(statistics.median(r.latency_ms for r in calls))
    assert run["latency_ms_avg"] == pytest.approx(statistics.mean(r.latency_ms for r in calls))
    assert body["totals"]["runs"] == 1


def test_records_filter_by_decision_and_show_rule_and_reason_of_denials(make_client, filled_store):
    stored = filled_store.audit.query(decision="deny", limit=None)

    body = make_client(filled_store.url).get("/api/records", params={"decision": "deny"}).json()

    assert body["total"] == len(stored)
    assert [(r["seq"], r["rule"], r["error"]) for r in body["records"]] == [
        (r.seq, r.rule, r.error) for r in stored
    ]
    assert all(r["error"] for r in body["records"]), "a denial must say why"


def test_records_filter_by_task_model_action_and_time(make_client, filled_store):
    everything = filled_store.audit.query(limit=None, order="asc")
    middle = everything[len(everything) // 2].time
    client = make_client(filled_store.url)

    by_task = client.get("/api/records", params={"task_id": "greedy"}).json()
    by_model = client.get("/api/records", params={"model": "gpt-4o", "action": "model.authorize"}).json()
    since = client.get("/api/records", params={"since": middle.isoformat(), "limit": 500}).json()

    assert {r["task_id"] for r in by_task["records"]} == {"greedy"}
    assert by_task["total"] == len(filled_store.audit.query(task_id="greedy", limit=None))
    assert [(r["model"], r["decision"]) for r in by_model["records"]] == [("gpt-4o", "deny")]
    assert since["total"] == sum(r.time >= middle for r in everything)


def test_spend_adds_up_to_the_cost_and_tokens_in_the_store(make_client, filled_store):
    records = filled_store.audit.query(limit=None)

    body = make_client(filled_store.url).get("/api/spend", params={"bucket": "hour"}).json()

    per_dag: dict[str, list[float]] = {}
    for point in body["points"]:
        total = per_dag.setdefault(point["dag_id"], [0.0, 0])
        total[0] += point["cost_usd"]
        total[1] += point["total_tokens"]
    for dag_id, (cost, tokens) in per_dag.items():
        mine = [r for r in records if r.dag_id == dag_id]
        assert cost == pytest.approx(sum(r.cost_usd or 0.0 for r in mine))
        assert tokens == sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in mine)
    assert set(per_dag) == {"api_a", "api_b"}


def test_budgets_agree_with_the_ledger(make_client, filled_store):
    ledger = {(s.budget, s.period): s for s in filled_store.ledger.status()}

    body = make_client(filled_store.url).get("/api/budgets", params={"history": 10}).json()

    assert {(u["budget"], u["period"]) for u in body} == set(ledger)
    for usage in body:
        status = ledger[(usage["budget"], usage["period"])]
        assert (usage["spent_tokens"], usage["reserved_tokens"], usage["max_tokens"]) == (
            status.spent_tokens,
            status.reserved_tokens,
            status.max_tokens,
        )
        assert usage["spent_cost_usd"] == pytest.approx(status.spent_cost_usd)
        if status.max_tokens:
            used = status.spent_tokens + status.reserved_tokens
            assert usage["used_tokens_fraction"] == pytest.approx(used / status.max_tokens)
    (run_budget,) = make_client(filled_store.url).get("/api/budgets", params={"period": "run-1"}).json()
    assert run_budget["budget"] == "api-per-run"


def test_verify_reports_an_intact_chain_then_the_edited_row(make_client, filled_store):
    client = make_client(filled_store.url, verify_max_age_seconds=3600)
    intact = client.get("/api/verify").json()
    with filled_store.engine.begin() as connection:
        connection.execute(update(audit_table).where(audit_table.c.seq == 2).values(latency_ms=1.0))

    cached = client.get("/api/verify").json()
    refreshed = client.get("/api/verify", params={"refresh": "true"}).json()

    assert intact["ok"] and intact["records_checked"] == len(filled_store.audit.query(limit=None))
    assert cached == intact  # reused within the window: verification walks the whole chain
    assert not refreshed["ok"] and refreshed["first_bad_seq"] == 2
    assert "row edited" in refreshed["problem"]


def test_options_list_what_the_filters_can_pick(make_client, filled_store):
    records = filled_store.audit.query(limit=None)

    body = make_client(filled_store.url).get("/api/options", params={"dag_id": "api_b"}).json()

    # Scoped to the DAG the permission was checked for: nothing about other DAGs leaks through.
    of_b = [r for r in records if r.dag_id == "api_b"]
    assert body["dag_ids"] == ["api_b"]
    assert body["task_ids"] == sorted({r.task_id for r in of_b if r.task_id})
    assert body["actions"] == sorted({r.action for r in of_b})
    everything = make_client(filled_store.url).get("/api/options").json()
    assert everything["dag_ids"] == sorted({r.dag_id for r in records if r.dag_id})


# -- validation, static files and failures -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "must be before 'until'"),
        ({"limit": 5000}, "less than or equal to 500"),
        ({"decision": "maybe"}, "'allow', 'deny' or 'n/a'"),
        ({"since": "yesterday"}, "valid datetime"),
    ],
)
def test_bad_filters_get_a_422_that_says_what_is_wrong(make_client, filled_store, params, expected):
    response = make_client(filled_store.url).get("/api/records", params=params)

    assert response.status_code == 422
    assert expected in response.text


def test_empty_form_fields_mean_no_filter(make_client, filled_store):
    body = make_client(filled_store.url).get("/api/records", params={"dag_id": "", "model": ""}).json()

    assert body["total"] == len(filled_store.audit.query(limit=None))


def test_the_page_and_only_the_known_static_files_are_served(make_client, filled_store):
    client = make_client(filled_store.url)

    page = client.get("/")
    script = client.get("/static/audit.js")

    assert 'src="static/audit.js"' in page.text and 'type="module"' in page.text
    assert script.headers["content-type"].startswith("text/javascript")
    assert "import.meta.url" in script.text
    for name in ("index.html", "..%2Fapi.py", "secrets.txt"):
        assert client.get(f"/static/{name}").status_code == 404


def test_an_unreachable_store_is_a_503_that_names_it_without_the_password(make_client):
    client = make_client("postgresql+psycopg://auditor:s3cret-pw@127.0.0.1:1/governance")

    response = client.get("/api/runs")

    assert response.status_code == 503
    assert "127.0.0.1:1/governance" in response.json()["detail"]
    assert "s3cret-pw" not in response.text


def test_without_a_store_url_the_app_reads_the_store_the_tasks_write_to(
    make_client, filled_store, monkeypatch
):
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", filled_store.url)

    body = make_client(None).get("/api/runs").json()

    assert body["totals"]["records"] == len(filled_store.audit.query(limit=None))


def test_the_governance_connection_store_url_wins_over_the_config(filled_store, tmp_path, monkeypatch):
    import json

    from governed_ai.plugins.api import governance_store_url

    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", f"sqlite:///{tmp_path / 'other.db'}")
    assert governance_store_url() == f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv(
        "AIRFLOW_CONN_GOVERNED_AI_GOVERNANCE_DEFAULT",
        json.dumps({"conn_type": "governed_ai_governance", "extra": {"store_url": filled_store.url}}),
    )
    assert governance_store_url() == filled_store.url


def test_verify_says_not_verified_when_the_server_has_no_key(
    make_client, filled_store, monkeypatch, tmp_path
):
    # An API server without the deployment key (no connection password, no config, no key file here).
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "api-server-home"))
    chain = make_client(filled_store.url).get("/api/verify").json()
    assert (chain["ok"], chain["status"]) == (False, "unverifiable")
    assert chain["problem"].startswith("cannot verify")
