"""Governor: decisions, denial records, redaction helpers and the keyed digest, without any model call.

The model-call flow (authorize, route, redact, journal, budget, audit) is the governed client's and is
tested in ``test_client.py`` against a real HTTP server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from governed_ai.core.audit import AuditStore
from governed_ai.core.errors import GovernanceDenied
from governed_ai.core.governor import Governor
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.policy import PolicyProvider
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject

SUBJECT = Subject(dag_id="unit_dag", task_id="unit_task", run_id="run-1")
EMAIL = "alice@example.com"
CARD = "4111 1111 1111 1111"  # Luhn-valid test card number

POLICY = """
version: 1
rules:
  - name: unit-rule
    match: {dag_id: "unit_*"}
    models: [{connection: llm, model: primary}]
    tools:
      - name: refund
        args:
          note: {regex: "[a-z]+"}
budgets:
  - {name: day, scope: dag, match: {dag_id: "unit_*"}, period: day, max_tokens: 1000}
"""


@pytest.fixture
def governor(tmp_path: Path) -> Iterator[Governor]:
    engine = create_store_engine(f"sqlite:///{tmp_path}/g.db")
    yield Governor(policy=PolicyProvider(text=POLICY), ledger=BudgetLedger(engine), audit=AuditStore(engine))
    engine.dispose()


def test_enforce_audits_an_allow_and_returns_the_decision(governor):
    decision = governor.enforce(SUBJECT, governor.engine().authorize_model(SUBJECT, "llm", "primary"))
    assert decision.allowed and decision.rule == "unit-rule"
    (record,) = governor.audit.query(action="model.authorize")
    assert (record.decision, record.rule, record.outcome) == ("allow", "unit-rule", "ok")


def test_denial_reasons_quoting_argument_values_are_redacted(governor):
    decision = governor.engine().authorize_tool(SUBJECT, "refund", {"note": f"card {CARD} mail {EMAIL}"})
    assert not decision.allowed and CARD in decision.reason  # the engine quotes the value ...
    with pytest.raises(GovernanceDenied) as denied:
        governor.enforce(SUBJECT, decision)
    (record,) = governor.audit.query(action="tool.authorize")
    assert record.decision == "deny" and denied.value.permanent
    for text in (str(denied.value), record.error or ""):  # ... governance never passes it on
        assert CARD not in text and EMAIL not in text


def test_mask_is_applied_after_the_redactor(governor):
    governor.mask = lambda text: text.replace("hunter2", "***")
    redaction = governor.engine().redaction_for(SUBJECT)
    text, found = governor.redact_text(f"log in with hunter2 as {EMAIL}", redaction)
    assert text == "log in with *** as [REDACTED:EMAIL]" and found == 1
    value, _ = governor.redact_obj({"k": ["hunter2", EMAIL]}, redaction)
    assert value == {"k": ["***", "[REDACTED:EMAIL]"]}


def test_budget_keys_are_the_current_policys(governor):
    (key,) = governor.budget_keys(SUBJECT)
    assert (key.budget, key.max_tokens, key.period_kind) == ("day", 1000, "day")


def test_the_instance_digest_ignores_the_try_and_the_digest_can_be_keyed(governor):
    first = governor.instance_digest(SUBJECT)
    assert governor.instance_digest(SUBJECT.model_copy(update={"try_number": 3})) == first
    assert governor.instance_digest(SUBJECT.model_copy(update={"map_index": 2})) != first
    keyed: Callable[[str], str] = lambda text: "k" + text[:10]  # noqa: E731
    governor.digest = keyed
    assert governor.instance_digest(SUBJECT) != first
