"""Order agent: a scheduled job in which an agent answers customer questions with governed tools.

What it shows, against the rule ``order-agent`` in ``policies/governance_policy.yaml``:

- ``answer_question`` (one mapped task per question) runs an :class:`AgentOperator` in constrained mode
  with three tools. The policy grants two read-only ones, ``lookup_order`` (only for ids matching
  ``[A-Z]{2}[0-9]{6}``) and ``search_kb``; it does not grant ``issue_refund``, so that tool is withheld: it
  is not in the JSON schema the model fills in, and the model cannot even name it. The agent must use a
  tool before it answers (``require_tool_call``); every tool result reaches the model redacted and marked
  as untrusted data.
- ``attempt_refund`` asks for ``issue_refund`` directly (a :class:`ToolOperator`), as a careless
  automation might: the policy denies it, the refund code never runs, and the task fails at once without
  retries. It does not stop the DAG run.
- ``audit_report`` (runs whatever happened upstream) reads this run's audit records, prints them and the
  agent's answers, and checks that the trail holds the allowed tool calls and the denied refund, that no
  refund was executed, and that the hash chain verifies.

Honest note: with the local SmolLM2-135M model the agent picks a tool and fills in valid arguments (the
schema guarantees it), but which tool it picks and what it answers are often poor; point the LLM
connection at a larger model and the same DAG gives useful answers. Governance does not depend on the
model: a refund is refused whatever the model or the questions say.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task

from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.agent import AgentOperator
from governed_ai.operators.tool import ToolOperator

try:  # Airflow puts the DAGs folder on sys.path
    import order_tools
except ImportError:  # imported from the repository root (tests, IDEs)
    from example_dags import order_tools

QUESTIONS = [
    "Where is my order AB123456? It should have arrived on Monday.",
    "The kettle from order CD654321 arrived broken. How do I return it?",
]

# Measured with SmolLM2-135M: short instructions; a larger model can take a richer prompt.
SYSTEM_PROMPT = "You are a customer support agent. Use a tool to find the facts, then answer in one sentence."


@dag(
    dag_id="order_agent",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["governed-ai", "agent", "example"],
    default_args={"owner": "support-ai", "retries": 1},
    doc_md=__doc__,
)
def order_agent() -> None:
    answers = AgentOperator.partial(
        task_id="answer_question",
        tools=["lookup_order", "search_kb", "issue_refund"],
        registry=order_tools.ORDER_TOOLS,
        system_prompt=SYSTEM_PROMPT,
        require_tool_call=True,
        max_steps=2,  # one tool call, then the answer
        max_tokens=64,
        temperature=0.0,
    ).expand(prompt=QUESTIONS)

    attempt_refund = ToolOperator(
        task_id="attempt_refund",
        tool="issue_refund",
        registry=order_tools.ORDER_TOOLS,
        arguments={"order_id": "CD654321", "amount_eur": 54.5, "reason": "kettle arrived broken"},
        retries=0,
    )

    @task(trigger_rule="all_done", retries=0)
    def audit_report(**context: Any) -> dict[str, Any]:
        governor = GovernanceHook().governor
        records = governor.audit.query(dag_id=context["dag"].dag_id, run_id=context["run_id"], order="asc")
        for r in records:
            where = r.task_id if r.map_index in (None, -1) else f"{r.task_id}[{r.map_index}]"
            print(f"{where}: {r.action} {r.resource} {r.decision} rule={r.rule} outcome={r.outcome}")
        for index, answer in enumerate(context["ti"].xcom_pull(task_ids="answer_question") or []):
            if answer:
                steps = ", ".join(f"{s['tool']}:{s['outcome']}" for s in answer["transcript"] if s["tool"])
                print(f"question {index}: tools [{steps}] withheld {answer['withheld_tools']}")
                print(f"  answer: {answer['final']}")

        allowed = [
            r
            for r in records
            if r.task_id == "answer_question" and r.action == "tool.authorize" and r.decision == "allow"
        ]
        refund_denials = [
            r
            for r in records
            if r.action == "tool.authorize" and r.resource == "issue_refund" and r.decision == "deny"
        ]
        refunds_run = [r for r in records if r.action == "tool.call" and r.resource == "issue_refund"]
        problems = []
        if not allowed:
            problems.append("no allowed tool call by the agent")
        if not refund_denials:
            problems.append("no denied refund")
        if refunds_run or order_tools.refunds_file().exists():
            problems.append("a refund was executed")
        chain = governor.audit.verify()
        print(f"audit chain: ok={chain.ok}, {chain.records_checked} records checked")
        if not chain.ok:
            problems.append(f"audit chain broken: {chain.problem}")
        if problems:
            raise RuntimeError("; ".join(problems))
        return {
            "allowed_tool_calls": len(allowed),
            "denied_refunds": len(refund_denials),
            "chain_ok": chain.ok,
        }

    [answers, attempt_refund] >> audit_report()


order_agent()
