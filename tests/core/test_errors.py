"""The provider's errors survive pickling (Celery results, the batch's forked shares): same class, same
message, same fields, the keyword-only ones included."""

from __future__ import annotations

import pickle

import pytest

from governed_ai.core.errors import (
    ApprovalRequired,
    BudgetExhausted,
    GovernanceDenied,
    GovernedAIError,
    StructuredOutputError,
)
from governed_ai.core.openai_gateway import UnsupportedRequest
from governed_ai.core.tools.runner import ToolDenied, ToolExecutionError

ERRORS: list[GovernedAIError] = [
    GovernanceDenied("no grant", action="model", resource="llm/m", rule="r1"),
    BudgetExhausted("spent", action="budget", resource="llm/m"),
    ToolDenied("bad args", tool="refund", rule="r2", by_arguments=True),
    ToolExecutionError("refund", "it raised"),
    ApprovalRequired(
        "needs a human",
        action="model",
        resource="llm/big",
        rule="r3",
        approvers=("cfo", "cto"),
        timeout_minutes=30,
        estimated_cost_usd=1.25,
    ),
    StructuredOutputError("no valid JSON", prompt_tokens=12, completion_tokens=34),
    UnsupportedRequest("stream=True is not supported", status=400),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda error: type(error).__name__)
def test_an_error_round_trips_through_pickle(error: GovernedAIError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)
    assert copy.permanent == error.permanent
