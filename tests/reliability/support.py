"""Shared pieces of the reliability tests: a task context (a named fake), the policy, reading the journal."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from governed_ai.core.journal import journal_table

DAG_ID = "reliability_dag"
TASK_ID = "classify"
RUN_ID = "manual__reliability"
TEMPLATE = "Classify the ticket [key={{ item.id }}]: {{ item.text }}"
KEY_IN_REPLY = re.compile(r"\[key=([^\]]+)\]")


@dataclass(frozen=True)
class FakeTaskInstance:
    """Stands in for Airflow's task instance. Defined here, not imported from tests/conftest.py, because
    the task subprocess must not run that module's environment setup."""

    dag_id: str
    task_id: str
    run_id: str
    try_number: int = 1
    map_index: int = -1


@dataclass(frozen=True)
class FakeTask:
    owner: str = "airflow"


@dataclass(frozen=True)
class FakeDag:
    tags: tuple[str, ...] = field(default=())


def task_context(*, try_number: int = 1, dag_id: str | None = None) -> dict[str, Any]:
    """A named fake of the Airflow task context for ``execute``; a retry has a higher try number."""
    ti = FakeTaskInstance(dag_id=dag_id or DAG_ID, task_id=TASK_ID, run_id=RUN_ID, try_number=try_number)
    return {"ti": ti, "task": FakeTask(), "dag": FakeDag(), "params": {}}


def journaled_keys(engine: Engine) -> set[str]:
    """Item keys of every completed model request in the journal. The journal stores no item key (only
    digests), so the key is read from the stored reply, in which the fault server echoes it."""
    table = journal_table
    with engine.connect() as connection:
        results = connection.execute(
            select(table.c.result).where(table.c.scope == "chat", table.c.state == "completed")
        )
        found = set()
        for (result,) in results:
            echoed = KEY_IN_REPLY.search(json.loads(result)["completion"]["content"] or "")
            if echoed:
                found.add(echoed.group(1))
        return found


def audited_items(records: list[Any], keys: set[str], outcome: str | None = None) -> set[str]:
    """Which of ``keys`` the audit ``records`` (with ``outcome``, if given) name; they carry item digests,
    never keys."""
    from governed_ai.core.client import item_digest
    from governed_ai.core.subject import Subject
    from governed_ai.hooks.governance import GovernanceHook

    governor = GovernanceHook().governor
    subject = Subject(dag_id=DAG_ID, task_id=TASK_ID, run_id=RUN_ID)
    digests = {item_digest(governor, subject, key): key for key in keys}
    return {
        digests[r.extra["item"]]
        for r in records
        if r.extra.get("item") in digests and (outcome is None or r.outcome == outcome)
    }


def policy(model: str = "fake-model", *, budget_tokens: int | None = None) -> str:
    text = f"""
version: 1
rules:
  - name: reliability
    match: {{dag_id: "{DAG_ID}*"}}
    models: [{{connection: test_llm, model: {model}}}]
"""
    if budget_tokens is not None:
        text += (
            f"budgets:\n  - {{name: shared-daily, scope: global, period: day, max_tokens: {budget_tokens}}}\n"
        )
    return text


def items(n: int) -> list[dict[str, str]]:
    return [{"id": f"item-{i:04d}", "text": f"ticket text {i}"} for i in range(n)]
