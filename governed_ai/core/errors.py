"""Every exception the provider raises on purpose, in one place, each saying whether a retry can help.

``permanent`` answers one question for the operators: would an Airflow retry of the task change the
outcome? A denial, bad configuration, invalid input or a call in doubt will not (the task fails at once,
without burning retries); an endpoint that failed after its own retries, or a store that was unreachable,
may (the task's retries apply). Operators translate these to Airflow exceptions in exactly one place
(:func:`governed_ai.operators.errors.airflow_errors`); the core never imports Airflow.
"""

from __future__ import annotations

from typing import ClassVar


class GovernedAIError(Exception):
    """Base of the provider's own errors."""

    #: True when retrying the task cannot change the outcome.
    permanent: ClassVar[bool] = True

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions unpickle as cls(*args), which keyword-only fields break (Celery results, the batch's
        # forked shares): rebuild without __init__, from the message and the attributes as they were.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(
    cls: type[GovernedAIError], args: tuple[object, ...], state: dict[str, object]
) -> GovernedAIError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


# -- refusals -------------------------------------------------------------------------------------------


class GovernanceDenied(GovernedAIError, PermissionError):
    """Policy or budget refused an action; it was audited as a ``deny`` record before this was raised."""

    def __init__(self, message: str, *, action: str, resource: str, rule: str | None = None) -> None:
        super().__init__(message)
        self.action = action
        self.resource = resource
        self.rule = rule


class BudgetExhausted(GovernanceDenied):
    """No budget left for the call: the limit, what is spent and what is held are in the message."""


class UnpricedModel(GovernanceDenied):
    """The model has no price, and a budget with a cost limit applies: its cost could never be counted."""


class ApprovalRequired(GovernedAIError):
    """The policy requires a human to approve this action first; nothing was reserved, paid or run.

    Operators answer it by asking through Airflow's human-in-the-loop mechanism and deferring; raised
    anywhere else (a DAG's own code), the task fails without retries, because a retry cannot approve.
    ``action`` is ``model``, ``tool`` or ``collection.write``; ``resource`` is what to approve (the
    connection/model, the tool, the collection); ``estimated_cost_usd`` is a model call's worst case (None:
    not a model call, or a model without a price).
    """

    def __init__(
        self,
        message: str,
        *,
        action: str,
        resource: str,
        rule: str,
        approvers: tuple[str, ...],
        timeout_minutes: int,
        estimated_cost_usd: float | None = None,
    ) -> None:
        super().__init__(message)
        self.action = action
        self.resource = resource
        self.rule = rule
        self.approvers = tuple(approvers)
        self.timeout_minutes = timeout_minutes
        self.estimated_cost_usd = estimated_cost_usd


class GovernanceUnavailable(GovernedAIError):
    """Governance could not decide (the store was unreachable): the call was not made. A retry may work."""

    permanent = False


# -- configuration and input ----------------------------------------------------------------------------


class ConfigurationError(GovernedAIError, ValueError):
    """A connection, setting or policy is wrong; the message names it and the fix."""


class InvalidInput(GovernedAIError, ValueError):
    """What the task was given cannot be processed (an empty prompt, a malformed batch file, ...)."""


# -- the model endpoint ---------------------------------------------------------------------------------


class ModelCallError(GovernedAIError):
    """The endpoint failed the call after the transport's retries; a later retry of the task may work."""

    permanent = False
    #: How many HTTP attempts the transport made before giving up (set by the transport).
    http_attempts: int | None = None


class ModelUnavailable(ModelCallError):
    """The endpoint cannot serve this model right now (not listed, or failing): the next fallback is tried."""


class ModelNotServed(ModelUnavailable):
    """The endpoint does not serve this model (not in its list, or HTTP 404); a fallback may still."""

    permanent = True


class EndpointRejected(ModelCallError):
    """The endpoint refused the request itself (HTTP 400/401/403/404): sending it again cannot help."""

    permanent = True


class MalformedResponse(ModelCallError):
    """The endpoint answered, but the body is not a usable completion (retried by the transport)."""


class StructuredOutputError(GovernedAIError, ValueError):
    """The reply still did not fit the schema after every repair attempt of this try.

    Not permanent: the attempts are journaled, so a retry of the task continues repairing from the last
    reply instead of paying for the same requests again. ``prompt_tokens``/``completion_tokens`` are what
    the failed attempts used.
    """

    permanent = False

    def __init__(self, message: str, *, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


# -- side effects ---------------------------------------------------------------------------------------


class CallInDoubt(GovernedAIError):
    """An earlier try started a side-effecting call and never recorded its end: a human must check it."""


def is_permanent(error: BaseException) -> bool:
    """Whether retrying the task cannot change ``error``'s outcome (unknown errors: retry)."""
    return isinstance(error, GovernedAIError) and error.permanent
