"""ToolOperator: parse-time checks, templated arguments, governance, and replay of side effects on retry.

The governance layer is real (policy file, SQLite store, audit trail, replay journal); the tools are real
functions that write what they do to a file, so side effects can be counted across "crashes".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from pydantic import BaseModel, Field

from governed_ai.core.tools import Tool, ToolRegistry, tool
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.tool import ToolOperator
from tests.conftest import FakeDag, FakeTask, FakeTaskInstance, fake_context

POLICY = """
version: 1
rules:
  - name: unit-tools
    match: {dag_id: unit_dag}
    tools:
      - name: lookup_order
        allow_other_args: false
        args:
          order_id: {regex: "[A-Z]{2}[0-9]{6}", required: true}
          limit: {type: integer, min: 1, max: 10}
      - name: issue_refund
"""


class OrderQuery(BaseModel):
    order_id: str
    limit: int | None = None


class Refund(BaseModel):
    order_id: str
    amount_eur: float = Field(gt=0)


class WorkerKilled(BaseException):
    """What the process sees when it dies mid-call (not an Exception: nothing in the task catches it)."""


class Effects:
    """Real tools that append one line per executed call to a file: the side effects to count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.die_inside_refund = False
        self.registry = ToolRegistry(name="unit")
        effects = self

        @tool(registry=self.registry, description="Status of an order.")
        def lookup_order(args: OrderQuery) -> dict[str, Any]:
            effects.write(f"lookup {args.order_id} {args.limit!r}")
            return {"order_id": args.order_id, "status": "shipped", "email": "jane@example.com"}

        @tool(registry=self.registry, description="Refund money.", side_effects=True)
        def issue_refund(args: Refund) -> dict[str, Any]:
            effects.write(f"refund {args.order_id} {args.amount_eur}")
            if effects.die_inside_refund:
                raise WorkerKilled()
            return {"refund_id": f"R-{len(effects.lines())}"}

        @tool(registry=self.registry, description="Delete all records.", side_effects=True)
        def delete_records(table: str) -> str:
            effects.write(f"delete {table}")
            return "deleted"

    def write(self, line: str) -> None:
        with self.path.open("a") as handle:
            handle.write(line + "\n")

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []


@pytest.fixture
def effects(tmp_path: Path, governance_policy) -> Effects:
    governance_policy(POLICY)
    return Effects(tmp_path / "effects.log")


def context(try_number: int = 1, run_id: str = "manual__unit") -> dict[str, Any]:
    return {
        "ti": FakeTaskInstance(run_id=run_id, try_number=try_number),
        "task": FakeTask(),
        "dag": FakeDag(),
    }


def audit_records(action: str | None = None) -> list[Any]:
    return GovernanceHook().governor.audit.query(dag_id="unit_dag", action=action, order="asc", limit=None)


# -- parse time --------------------------------------------------------------------------------------------


def test_unknown_tool_name_fails_at_parse_time_listing_the_registered_tools(effects):
    with pytest.raises(
        ValueError, match=r"refund_all: 'tool': no tool named 'refund' in registry 'unit'"
    ) as caught:
        ToolOperator(task_id="refund_all", tool="refund", registry=effects.registry)
    assert "(registered: delete_records, issue_refund, lookup_order)" in str(caught.value)


def test_arguments_must_be_a_dict(effects):
    with pytest.raises(TypeError, match="t: 'arguments' must be a dict"):
        ToolOperator(task_id="t", tool="lookup_order", arguments=["AB123456"], registry=effects.registry)  # type: ignore[arg-type]


def test_a_tool_object_can_be_given_directly(effects):
    refund = effects.registry.get("issue_refund")
    op = ToolOperator(task_id="t", tool=refund, arguments={})
    assert op.tool is refund
    assert isinstance(op.tool, Tool)
    assert op.template_fields == ("arguments",)


# -- execute -----------------------------------------------------------------------------------------------


def test_allowed_call_pushes_the_redacted_result_and_is_audited(effects):
    op = ToolOperator(
        task_id="unit_task",
        tool="lookup_order",
        arguments={"order_id": "AB123456"},
        registry=effects.registry,
    )
    xcom = op.execute(context=fake_context())  # type: ignore[arg-type]
    assert xcom["tool"] == "lookup_order"
    assert xcom["result"] == {"order_id": "AB123456", "status": "shipped", "email": "[REDACTED:EMAIL]"}
    assert xcom["replayed"] is False
    assert xcom["rule"] == "unit-tools"
    assert len(xcom["idempotency_key_sha256"]) == 64
    assert effects.lines() == ["lookup AB123456 None"]
    assert [(r.action, r.decision, r.outcome) for r in audit_records()] == [
        ("tool.authorize", "allow", "ok"),
        ("tool.call", "allow", "ok"),
    ]


def test_rendered_string_arguments_are_converted_to_the_declared_types(effects):
    op = ToolOperator(
        task_id="unit_task",
        tool="lookup_order",
        arguments={"order_id": "{{ params.order }}", "limit": "{{ params.limit }}"},
        registry=effects.registry,
    )
    op.render_template_fields({"params": {"order": "AB123456", "limit": 5}})
    assert op.arguments == {"order_id": "AB123456", "limit": "5"}  # Jinja renders text
    op.execute(context=fake_context())  # type: ignore[arg-type]
    assert effects.lines() == ["lookup AB123456 5"]  # validated to an int, which the policy then checked


def test_policy_argument_constraints_deny_without_running_the_tool(effects):
    op = ToolOperator(
        task_id="unit_task",
        tool="lookup_order",
        arguments={"order_id": "AB123456", "limit": 50},
        registry=effects.registry,
    )
    with pytest.raises(
        AirflowFailException, match=r"unit_task: denied by governance: .*'limit' must be <= 10"
    ):
        op.execute(context=fake_context())  # type: ignore[arg-type]
    assert effects.lines() == []


def test_a_tool_the_policy_does_not_grant_is_denied_and_never_runs(effects):
    op = ToolOperator(
        task_id="unit_task", tool="delete_records", arguments={"table": "orders"}, registry=effects.registry
    )
    with pytest.raises(AirflowFailException, match="denied by governance: denied tool 'delete_records'"):
        op.execute(context=fake_context())  # type: ignore[arg-type]
    assert effects.lines() == []
    (record,) = audit_records()
    assert (record.action, record.resource, record.decision) == ("tool.authorize", "delete_records", "deny")


def test_invalid_arguments_fail_without_retry_naming_the_field(effects):
    op = ToolOperator(
        task_id="unit_task",
        tool="issue_refund",
        arguments={"order_id": "AB123456", "amount_eur": -3},
        registry=effects.registry,
    )
    with pytest.raises(
        AirflowFailException,
        match=r"invalid arguments for tool 'issue_refund':\n- amount_eur: Input should be greater than 0",
    ):
        op.execute(context=fake_context())  # type: ignore[arg-type]
    assert effects.lines() == []


class CrashAfterTheCall(ToolOperator):
    """The task dies after its tool call completed and before the task finished (e.g. the worker is lost
    while pushing the XCom)."""

    crash = True

    def execute(self, context: Any) -> dict[str, Any]:
        result = super().execute(context)
        if self.crash:
            raise RuntimeError("worker lost before the task finished")
        return result


def test_a_retry_after_a_crash_replays_the_side_effect_instead_of_repeating_it(effects):
    op = CrashAfterTheCall(
        task_id="unit_task",
        tool="issue_refund",
        arguments={"order_id": "AB123456", "amount_eur": 20},
        registry=effects.registry,
    )
    with pytest.raises(RuntimeError, match="worker lost"):
        op.execute(context=context(try_number=1))
    assert effects.lines() == ["refund AB123456 20.0"]

    op.crash = False
    xcom = op.execute(context=context(try_number=2))
    assert effects.lines() == ["refund AB123456 20.0"]  # still once
    assert xcom["replayed"] is True
    assert xcom["result"] == {"refund_id": "R-1"}
    calls = audit_records("tool.call")
    assert [(r.try_number, r.outcome) for r in calls] == [(1, "ok"), (2, "replayed")]

    # A new run is new work: the refund happens for it.
    op.execute(context=context(try_number=1, run_id="manual__next"))
    assert len(effects.lines()) == 2


def test_a_call_cut_off_mid_way_is_in_doubt_and_not_repeated(effects):
    effects.die_inside_refund = True
    op = ToolOperator(
        task_id="unit_task",
        tool="issue_refund",
        arguments={"order_id": "AB123456", "amount_eur": 20},
        registry=effects.registry,
    )
    with pytest.raises(WorkerKilled):
        op.execute(context=context(try_number=1))
    effects.die_inside_refund = False
    with pytest.raises(AirflowFailException, match="is in doubt: an earlier attempt started it"):
        op.execute(context=context(try_number=2))
    assert effects.lines() == ["refund AB123456 20.0"]
    assert [r.outcome for r in audit_records("tool.call")] == ["in_doubt"]


# -- approval by policy ------------------------------------------------------------------------------------

APPROVAL_POLICY = (
    POLICY
    + """  - name: refunds-need-approval
    match: {dag_id: unit_dag}
    require_approval:
      - {tools: [issue_refund], approvers: [support-lead], timeout_minutes: 15}
"""
)


@dataclass(frozen=True)
class TaskInstanceWithId(FakeTaskInstance):
    """The fake task instance with the id Airflow's human-in-the-loop request is keyed by."""

    id: str = "01a2348a-609f-7051-9a1a-c254154e5cc5"


def context_with_ti_id() -> dict[str, Any]:
    return {"ti": TaskInstanceWithId(), "task": FakeTask(), "dag": FakeDag()}


def test_a_tool_the_policy_wants_approved_asks_airflow_waits_and_runs_once_approved(
    tmp_path: Path, governance_policy, monkeypatch: pytest.MonkeyPatch
):
    import airflow.sdk.execution_time.hitl as hitl
    from airflow.sdk.exceptions import TaskAwaitingInput

    governance_policy(APPROVAL_POLICY)
    effects = Effects(tmp_path / "effects.log")
    asked: list[dict[str, Any]] = []
    # A recording stand-in for Airflow's writer of the HITL row (it talks to the task supervisor).
    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **request: asked.append(request))

    ctx = context_with_ti_id()
    op = ToolOperator(task_id="unit_task", tool="issue_refund", arguments={"order_id": "AB123456",
                      "amount_eur": 40.0}, registry=effects.registry)  # fmt: skip
    with pytest.raises(TaskAwaitingInput) as parked:
        op.execute(context=ctx)  # type: ignore[arg-type]
    assert effects.lines() == []  # nothing ran before the answer
    (request,) = asked
    assert request["options"] == ["Approve", "Reject"] and request["defaults"] is None
    assert request["assigned_users"] == [{"id": "support-lead", "name": "support-lead"}]
    assert "issue_refund" in request["subject"] and "AB123456" not in request["subject"] + request["body"]
    assert parked.value.method_name == "resume_after_approval"
    assert parked.value.timeout.total_seconds() == 15 * 60

    lead = {"id": "support-lead", "name": "support-lead"}
    event = {"chosen_options": ["Approve"], "responded_by_user": lead}
    done = op.resume_after_approval(ctx, event=event, **parked.value.kwargs)  # type: ignore[arg-type]
    assert done["replayed"] is False and effects.lines() == ["refund AB123456 40.0"]
    # Resumed again (a retry of the task): the journal replays the refund, it is not repeated.
    again = op.execute(context=ctx)  # type: ignore[arg-type]
    assert again["replayed"] is True and effects.lines() == ["refund AB123456 40.0"]
    actions = [(r.action, r.decision) for r in audit_records() if r.action.startswith("approval.")]
    assert actions == [("approval.requested", "n/a"), ("approval.granted", "allow")]


def test_a_second_different_approval_in_one_task_instance_is_refused_not_asked(
    tmp_path: Path, governance_policy, monkeypatch: pytest.MonkeyPatch
):
    import airflow.sdk.execution_time.hitl as hitl
    from airflow.sdk.exceptions import TaskAwaitingInput

    governance_policy(APPROVAL_POLICY + "      - {tools: [lookup_order], approvers: [auditor]}\n")
    effects = Effects(tmp_path / "effects.log")
    asked: list[dict[str, Any]] = []
    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **request: asked.append(request))
    refund = ToolOperator(task_id="unit_task", tool="issue_refund", arguments={"order_id": "AB123456",
                          "amount_eur": 40.0}, registry=effects.registry)  # fmt: skip
    with pytest.raises(TaskAwaitingInput):
        refund.execute(context=context_with_ti_id())  # type: ignore[arg-type]
    # The same task instance now needs another approval: Airflow would show the first request's text.
    lookup = ToolOperator(task_id="unit_task", tool="lookup_order", arguments={"order_id": "AB123456"},
                          registry=effects.registry)  # fmt: skip
    with pytest.raises(AirflowFailException, match="already asked for one"):
        lookup.execute(context=context_with_ti_id())  # type: ignore[arg-type]
    assert len(asked) == 1 and effects.lines() == []
    (refused,) = audit_records("approval.rejected")
    assert (refused.resource, refused.decision, refused.outcome) == ("lookup_order", "deny", "second_request")
