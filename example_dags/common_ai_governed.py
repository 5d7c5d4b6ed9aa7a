"""Governing code we did not write: a plain ``openai`` SDK call in a ``@task`` and common-ai's operators.

Teams already call models from ``@task`` code with the ``openai`` SDK and through
apache-airflow-providers-common-ai (pydantic-ai agents). Here each of those goes through the same policy,
budgets, redaction, replay journal and audit trail as the provider's own operators
(``policies/governance_policy.yaml``, rule ``common-ai-governed``):

- ``plain_openai_call``: ordinary SDK code; the only change is where the client comes from
  (``GovernanceHook().openai_client(context)``). It asks for the policy route ``default``.
- ``retried_after_paying``: pays for a call, then fails its first try on purpose (a stand-in for a crash
  after the model answered). The retry asks the same question and gets the journal's answer: the
  provider is not paid twice (a ``model.replay`` record, no second ``model.call``).
- ``common_ai_llm``: common-ai's ``LLMOperator``, unchanged, with ``llm_conn_id`` a connection of type
  ``governed_ai_pydanticai`` (``governed_ai_pydanticai_default``: create it with
  ``AIRFLOW_CONN_GOVERNED_AI_PYDANTICAI_DEFAULT='{"conn_type": "governed_ai_pydanticai"}'``, which points at
  ``governed_ai_llm_default``). Its first try also fails on purpose after the operator finished (a
  ``post_execute`` hook): the retry's agent run is answered from the journal, not paid again.
- ``common_ai_agent``: common-ai's ``AgentOperator`` with a read-only tool, through the same connection.
  Its model requests are governed; the tool itself runs in pydantic-ai (the policy's ``tools`` grants
  apply to the provider's own agent operator, not to pydantic-ai toolsets).
- ``audit_check``: reads this run's audit records and checks that every task's calls are there.

Without the ``common-ai`` extra installed, this file defines no DAG (the DAG folder still loads).
The local model is small: the answers are short and sometimes odd; the point is the governance around them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, task

from governed_ai.hooks.governance import GovernanceHook

try:
    from airflow.providers.common.ai.operators.agent import AgentOperator
    from airflow.providers.common.ai.operators.llm import LLMOperator as CommonAILLMOperator
    from pydantic_ai.toolsets import FunctionToolset
except ImportError:  # the common-ai extra is not installed
    CommonAILLMOperator = None  # type: ignore[assignment,misc]

GOVERNED_PYDANTIC_AI_CONN = "governed_ai_pydanticai_default"
QUESTION = "In one short sentence: why do data pipelines need retries?"
ORDER_STATUS = {"AB123456": "shipped on 2026-01-02", "CD654321": "waiting for stock"}


def order_status(order_id: str) -> str:
    """The shipping status of an order (read-only lookup in a fixed table)."""
    return ORDER_STATUS.get(order_id.strip().upper(), "unknown order")


def crash_after_first_try(context: Any, result: Any = None) -> None:
    """Fails a task's first try after its work (and its paid model calls) finished: a stand-in for a
    worker lost at the worst moment, to show that the retry replays instead of paying again."""
    if context["ti"].try_number == 1:
        raise RuntimeError("simulated crash after the model call was paid: the retry replays it")


def ask_governed(context: dict[str, Any], question: str) -> dict[str, Any]:
    """One chat completion through the governed openai client of the running task."""
    with GovernanceHook().openai_client(context) as client:
        reply = client.chat.completions.create(
            model="default",  # a policy route: the policy picks the model
            messages=[
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": question},
            ],
            max_tokens=40,
            temperature=0.0,
        )
    governance = (reply.model_extra or {}).get("governed_ai", {})
    return {
        "answer": reply.choices[0].message.content,
        "model": reply.model,
        "tokens": reply.usage.total_tokens if reply.usage else 0,
        "replayed": governance.get("replayed"),
        "rule": governance.get("rule"),
    }


if CommonAILLMOperator is not None:

    @dag(
        dag_id="common_ai_governed",
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        tags=["governed-ai", "common-ai", "example"],
        default_args={"owner": "ai-platform", "retries": 0},
        doc_md=__doc__,
    )
    def common_ai_governed() -> None:
        @task
        def plain_openai_call(**context: Any) -> dict[str, Any]:
            return ask_governed(context, QUESTION)

        @task(retries=1, retry_delay=timedelta(seconds=0))
        def retried_after_paying(**context: Any) -> dict[str, Any]:
            result = ask_governed(context, "Name one reason a task might be retried.")
            crash_after_first_try(context)
            return result

        common_ai_llm = CommonAILLMOperator(
            task_id="common_ai_llm",
            llm_conn_id=GOVERNED_PYDANTIC_AI_CONN,
            system_prompt="Answer briefly.",
            prompt="In one short sentence: what does a scheduler do?",
            model_settings={"max_tokens": 40, "temperature": 0.0},
            retries=1,
            retry_delay=timedelta(seconds=0),
            post_execute=crash_after_first_try,
        )
        common_ai_agent = AgentOperator(
            task_id="common_ai_agent",
            llm_conn_id=GOVERNED_PYDANTIC_AI_CONN,
            system_prompt="You answer questions about orders. Use the order_status tool when useful.",
            prompt="What is the status of order AB123456?",
            toolsets=[FunctionToolset([order_status], id="orders")],
            agent_params={"model_settings": {"max_tokens": 60, "temperature": 0.0}},
            cache_prompt=False,  # prompt caching settings are for hosted APIs, not this local model
        )

        @task(trigger_rule="all_done")
        def audit_check(**context: Any) -> dict[str, Any]:
            audit = GovernanceHook().governor.audit
            records = audit.query(dag_id=context["dag"].dag_id, run_id=context["run_id"], order="asc")
            calls: dict[str, int] = {}
            for record in records:
                print(
                    f"{record.task_id}: {record.action} {record.resource} {record.decision} "
                    f"rule={record.rule} outcome={record.outcome}"
                )
                if record.action in ("model.call", "model.replay"):
                    key = f"{record.task_id}:{record.action}"
                    calls[key] = calls.get(key, 0) + 1
            expected = {
                "plain_openai_call:model.call",
                "retried_after_paying:model.call",
                "retried_after_paying:model.replay",
                "common_ai_llm:model.call",
                "common_ai_llm:model.replay",
                "common_ai_agent:model.call",
            }
            missing = expected - set(calls)
            if missing:
                raise ValueError(f"audit records missing for this run: {sorted(missing)}; found {calls}")
            for retried in ("retried_after_paying", "common_ai_llm"):
                if calls[f"{retried}:model.call"] != 1:
                    raise ValueError(f"the retry of {retried} paid again: {calls}")
            return calls

        (plain_openai_call() >> retried_after_paying() >> common_ai_llm >> common_ai_agent >> audit_check())

    common_ai_governed()
