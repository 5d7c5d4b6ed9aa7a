"""Approval by policy: the platform's policy, not the DAG, decides that a human approves a model call.

The DAG is an ordinary ``LLMOperator`` task: nothing in it asks for approval. The rule
``approval-by-policy`` in ``policies/governance_policy.yaml`` grants the local model to this DAG and says
``require_approval`` for it, with ``admin`` as the approver and a 30-minute timeout. So when the task
runs it:

1. is allowed by the policy, but finds no recorded approval for this task instance: before anything is
   reserved or sent it writes an ``approval.requested`` audit record and a human-in-the-loop request in
   Airflow (options *Approve* / *Reject*, assigned to ``admin``; the text names the model, the rule and the
   estimated cost, never the prompt), then **defers**: it waits in the triggerer, holding no worker slot;
2. resumes when ``admin`` answers in the UI (*Required Actions*) or through the REST API
   (``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails`` with
   ``{"chosen_options": ["Approve"], "params_input": {}}``);
3. approved: audits ``approval.granted`` with the approver and makes the call (once: a retry replays it);
   rejected, answered by someone else, or unanswered for 30 minutes: audits ``approval.rejected`` (a
   ``deny``) and fails without retries, with no request sent.

Not part of ``scripts/demo.sh``: it waits for a person. ``tests/production/test_approval_standalone.py``
runs it on ``airflow standalone`` and answers through the REST API.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from governed_ai.operators.llm import LLMOperator


@dag(
    dag_id="approval_by_policy",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["governed-ai", "approval", "example"],
    default_args={"owner": "support-ai", "retries": 1},
    doc_md=__doc__,
)
def approval_by_policy() -> None:
    LLMOperator(
        task_id="draft_refund_reply",
        system_prompt="You write short, polite customer-support replies.",
        prompt=(
            "Write two sentences telling a customer that the refund of EUR 40 for order AB123456 is approved."
        ),
        model="smollm2",
        max_tokens=80,
    )


approval_by_policy()
