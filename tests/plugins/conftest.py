"""Fixtures for the plugin tests: Airflow's real auth manager with tokens, and a filled governance store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from governed_ai.core.audit import AuditStore
from governed_ai.core.governor import Governor
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.policy import PolicyProvider
from governed_ai.core.pricing import PriceTable
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.hooks.governance import GovernanceHook
from tests.fakes.governed_calls import record_governed_call

PRICES = PriceTable.from_mapping({"*": {"input_per_1m_tokens": 3.0, "output_per_1m_tokens": 15.0}})
POLICY = """
version: 1
rules:
  - name: api-rule
    match: {dag_id: "api_*"}
    models:
      - {connection: llm, model: small}
budgets:
  - name: api-per-run
    scope: dag
    match: {dag_id: "api_*"}
    period: run
    max_tokens: 300
  - name: api-daily
    scope: global
    period: day
    max_cost_usd: 1.0
"""


@dataclass(frozen=True)
class Tokens:
    """JWTs issued by Airflow's real (simple) auth manager for users with different roles."""

    admin: str
    viewer: str
    no_role: str


@pytest.fixture(scope="session")
def auth_tokens(airflow_db: Path) -> Tokens:
    """Initialises Airflow's configured auth manager (SimpleAuthManager) the way the API server does."""
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    manager = init_auth_manager()
    return Tokens(
        admin=manager.generate_jwt(SimpleAuthManagerUser(username="admin", role="admin")),
        viewer=manager.generate_jwt(SimpleAuthManagerUser(username="ada", role="viewer")),
        no_role=manager.generate_jwt(SimpleAuthManagerUser(username="nobody", role=None)),
    )


@dataclass
class ScriptedModel:
    """A named fake of the model endpoint: fixed usage, the next scripted latency."""

    latencies: list[float]
    prompt_tokens: int = 40
    completion_tokens: int = 9


@dataclass
class FilledStore:
    url: str
    engine: Engine
    audit: AuditStore
    ledger: BudgetLedger


def governed_call(
    governor: Governor, subject: Subject, model: str, fake: ScriptedModel, max_tokens: int
) -> None:
    """One call's records as the governed client writes them (denials are part of what the API reports)."""
    outcome = record_governed_call(
        governor, subject, model, latency_ms=fake.latencies[0], prompt_tokens=fake.prompt_tokens,
        completion_tokens=fake.completion_tokens, max_tokens=max_tokens, prices=PRICES,
    )  # fmt: skip
    if outcome == "ok":
        fake.latencies.pop(0)


@pytest.fixture
def filled_store(tmp_path: Path) -> Iterator[FilledStore]:
    """A SQLite governance store filled through the real Governor: two runs with allowed calls, a model
    no rule grants and a call the per-run budget stops."""
    url = f"sqlite:///{tmp_path / 'governance.db'}"
    engine = create_store_engine(url)
    # Keyed and anchored the way the tasks write it, so the plugin (which finds the key and anchors the
    # same way) can verify the chain.
    hook = GovernanceHook()
    audit = AuditStore(engine, key=hook.audit_key(), anchors=hook.anchor_log())
    ledger = BudgetLedger(engine)
    governor = Governor(policy=PolicyProvider(text=POLICY), ledger=ledger, audit=audit)
    fake = ScriptedModel(latencies=[30.0, 10.0, 20.0, 60.0])
    run_1 = Subject(dag_id="api_a", task_id="ask", run_id="run-1")
    for _ in range(3):
        governed_call(governor, run_1, "small", fake, max_tokens=20)
    governed_call(governor, run_1.model_copy(update={"task_id": "sneaky"}), "gpt-4o", fake, max_tokens=20)
    governed_call(governor, run_1.model_copy(update={"task_id": "greedy"}), "small", fake, max_tokens=290)
    governed_call(
        governor, Subject(dag_id="api_b", task_id="ask", run_id="run-2"), "small", fake, max_tokens=20
    )
    yield FilledStore(url=url, engine=engine, audit=audit, ledger=ledger)
    engine.dispose()


@pytest.fixture
def make_client(auth_tokens: Tokens) -> Callable[..., Any]:
    """A TestClient on the plugin's app over ``store_url``, authenticated as ``role`` (None: anonymous)."""
    from fastapi.testclient import TestClient

    from governed_ai.plugins.api import create_app

    def make(
        store_url: str | None, role: str | None = "admin", *, via_cookie: bool = False, **app_kwargs: Any
    ):
        app = create_app(store_url, **app_kwargs)
        token = None if role is None else getattr(auth_tokens, role)
        if token is None:
            return TestClient(app)
        if via_cookie:
            return TestClient(app, cookies={"_token": token})
        return TestClient(app, headers={"Authorization": f"Bearer {token}"})

    return make
