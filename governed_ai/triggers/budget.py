"""Trigger that waits, in the triggerer, until a task's budgets have room again (deferrable BudgetSensor)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class BudgetTrigger(BaseTrigger):
    """Polls the budget ledger without holding a worker slot, until the budgets that apply to the task have
    room for ``tokens`` (and ``cost_usd``): typically when the next day or month begins.

    The budgets are looked up in the policy at every check, so a new period (or a raised limit) is seen
    as soon as it applies.

    :param subject: The task's identity (``Subject`` fields, as a dict).
    :param tokens: Room needed, in tokens.
    :param cost_usd: Room needed, in dollars.
    :param budgets: Only these budgets (by name); None: every budget that applies.
    :param governance_conn_id: The governance connection, as the deployment configured it.
    :param poll_interval: Seconds between checks.
    """

    def __init__(
        self,
        subject: dict[str, Any],
        tokens: int,
        cost_usd: float,
        budgets: list[str] | None,
        governance_conn_id: str,
        poll_interval: float = 60.0,
    ) -> None:
        super().__init__()
        self.subject = subject
        self.tokens = tokens
        self.cost_usd = cost_usd
        self.budgets = budgets
        self.governance_conn_id = governance_conn_id
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "subject": self.subject,
                "tokens": self.tokens,
                "cost_usd": self.cost_usd,
                "budgets": self.budgets,
                "governance_conn_id": self.governance_conn_id,
                "poll_interval": self.poll_interval,
            },
        )

    def _check(self) -> tuple[bool, str]:
        from governed_ai.core.budget import room_for
        from governed_ai.core.subject import Subject
        from governed_ai.hooks.governance import GovernanceHook

        governor = GovernanceHook(governance_conn_id=self.governance_conn_id).governor
        return room_for(
            governor,
            Subject.model_validate(self.subject),
            tokens=self.tokens,
            cost_usd=self.cost_usd,
            budgets=self.budgets,
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                ready, reason = await asyncio.to_thread(self._check)
            except Exception as error:  # reported to the sensor, which fails with the reason
                yield TriggerEvent({"status": "error", "message": str(error)})
                return
            if ready:
                yield TriggerEvent({"status": "success", "message": reason})
                return
            self.log.info("%s; checking again in %.0f s", reason, self.poll_interval)
            await asyncio.sleep(self.poll_interval)
