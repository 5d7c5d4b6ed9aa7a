"""Sensor that waits until the task's budgets have room again: a capped job resumes in the same run."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException, BaseSensorOperator

from governed_ai.core.budget import room_for
from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.errors import airflow_errors
from governed_ai.triggers.budget import BudgetTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context


class BudgetSensor(BaseSensorOperator):
    """Wait until the budgets that apply to this task (or those named) have room for ``min_tokens`` (and
    ``min_cost_usd``) on top of what is spent and held: e.g. until tomorrow's daily budget begins, so that a
    batch the budget stopped (``on_budget_exhausted="succeed"``) resumes inside the same DAG run.

    Budgets apply by the policy's match rules, as for any governed task: put the sensor in the same DAG
    (and under the same owner and tags) as the work it waits for. By default it is deferrable and waits in
    the triggerer, holding no worker slot; with ``deferrable=False`` it reschedules.

    :param budgets: Budget names to wait for; None (default): every budget that applies to the task.
    :param min_tokens: Room needed, in tokens (e.g. a batch item's worst case times the block size).
    :param min_cost_usd: Room needed, in dollars (0: only tokens count).
    :param deferrable: Wait in the triggerer (default) instead of rescheduling.
    :param governance_conn_id: Connection of type ``governed_ai_governance`` (optional; default
        ``governed_ai_governance_default``). Only connections the deployment lists in ``[governed_ai]
        allowed_governance_conn_ids`` may be named; any other fails the task before any call.

    Other parameters (``poke_interval``, ``timeout``, ``soft_fail``, ``mode``) are those of
    ``BaseSensorOperator``; ``poke_interval`` defaults to 5 minutes here.
    """

    template_fields: Sequence[str] = ("budgets",)
    ui_color = "#fff4e5"

    def __init__(
        self,
        *,
        budgets: list[str] | None = None,
        min_tokens: int = 1,
        min_cost_usd: float = 0.0,
        deferrable: bool = True,
        governance_conn_id: str = GovernanceHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("mode", "reschedule")
        kwargs.setdefault("poke_interval", 300)
        super().__init__(**kwargs)
        if min_tokens < 0 or min_cost_usd < 0:
            raise ValueError(f"{self.task_id}: 'min_tokens' and 'min_cost_usd' must be 0 or more.")
        if isinstance(budgets, str):
            raise TypeError(f"{self.task_id}: 'budgets' must be a list of budget names, got {budgets!r}.")
        self.budgets = budgets
        self.min_tokens = min_tokens
        self.min_cost_usd = min_cost_usd
        self.deferrable = deferrable
        self.governance_conn_id = governance_conn_id

    def poke(self, context: Context) -> bool:
        with airflow_errors(self.task_id):  # a governance connection the deployment does not allow
            hook = GovernanceHook(governance_conn_id=self.governance_conn_id)
        ready, reason = room_for(
            hook.governor,
            hook.subject_from_context(context),
            tokens=self.min_tokens,
            cost_usd=self.min_cost_usd,
            budgets=self.budgets,
        )
        self.log.info("%s", reason)
        return ready

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        if self.poke(context):
            return None
        subject = GovernanceHook.subject_from_context(context)
        self.defer(
            trigger=BudgetTrigger(
                subject=subject.model_dump(mode="json"),
                tokens=self.min_tokens,
                cost_usd=self.min_cost_usd,
                budgets=self.budgets,
                governance_conn_id=self.governance_conn_id,
                poll_interval=float(self.poke_interval),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> None:
        if event.get("status") != "success":
            raise AirflowFailException(f"{self.task_id}: waiting for budget failed: {event.get('message')}")
        self.log.info("%s", event.get("message"))
