"""Governance showcase: an allowed call, a denied call, a cheaper model near the budget's limit and a budget
stop, all in the audit trail.

What it shows, against the policy in ``policies/governance_policy.yaml``:

- ``allowed_call`` asks the local model a question; the rule ``governance-showcase`` grants it.
- ``denied_model`` asks for ``gpt-4o``, which no rule grants to this DAG: the task fails at once, without
  retries and without any request reaching a model server, and the denial names how to grant it.
- ``near_the_limit`` asks for the route ``default``; the rule routes it to ``smollm2``, but once the run's
  budget is past 15% used it switches to the cheaper ``smollm2-economy`` (the same local weights served
  under a second name with a lower nominal price): the switch is a ``model.route`` record, in the task's
  XCom (``governance.budget_route``) and in its lineage facet.
- ``over_budget`` asks for up to 256 reply tokens when the per-run budget ``showcase-per-run`` (300
  tokens) cannot hold that on top of what ``allowed_call`` spent: it is stopped before the call.
- ``audit_report`` (runs whatever happened upstream) reads this run's audit records and checks that
  the three outcomes are there and that the hash chain verifies.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task

from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.llm import LLMOperator


@dag(
    dag_id="governance_showcase",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["governed-ai", "governance", "example"],
    default_args={"owner": "ai-platform", "retries": 2},
    doc_md=__doc__,
)
def governance_showcase() -> None:
    allowed_call = LLMOperator(
        task_id="allowed_call",
        system_prompt="Answer in one short sentence.",
        prompt="What is a data pipeline?",
        max_tokens=60,
        temperature=0.0,
        prompt_name="showcase-question",
        prompt_version_label="v1",
    )
    denied_model = LLMOperator(
        task_id="denied_model",
        prompt="What is a data pipeline?",
        model="gpt-4o",
        max_tokens=60,
    )
    near_the_limit = LLMOperator(
        task_id="near_the_limit",
        trigger_rule="all_done",  # runs although denied_model failed
        prompt="Name one tool that schedules data pipelines.",
        model="default",  # a policy route: it picks the model, and a cheaper one near the budget's limit
        max_tokens=24,
        temperature=0.0,
    )
    over_budget = LLMOperator(
        task_id="over_budget",
        trigger_rule="all_done",  # runs although denied_model failed: that failure is the point
        prompt="Write a long essay about data pipelines.",
        max_tokens=256,
    )

    @task(trigger_rule="all_done", retries=0)
    def audit_report(**context: Any) -> dict[str, Any]:
        governor = GovernanceHook().governor
        records = governor.audit.query(dag_id=context["dag"].dag_id, run_id=context["run_id"], order="asc")
        for r in records:
            print(f"{r.task_id}: {r.action} {r.resource} {r.decision} rule={r.rule} outcome={r.outcome}")
        outcomes = {(r.task_id, r.action, r.decision) for r in records}
        expected = {
            ("allowed_call", "model.call", "allow"),
            ("denied_model", "model.authorize", "deny"),
            ("near_the_limit", "model.route", "n/a"),
            ("over_budget", "budget.deny", "deny"),
        }
        missing = expected - outcomes
        if missing:
            raise RuntimeError(f"audit trail lacks {sorted(missing)}")
        chain = governor.audit.verify()
        print(f"audit chain: ok={chain.ok}, {chain.records_checked} records checked")
        if not chain.ok:
            raise RuntimeError(f"audit chain broken: {chain.problem}")
        return {"records": len(records), "chain_ok": chain.ok}

    allowed_call >> denied_model >> near_the_limit >> over_budget >> audit_report()


governance_showcase()
