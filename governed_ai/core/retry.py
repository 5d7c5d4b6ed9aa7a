"""The one retry policy for requests to a model or embedding endpoint: which failures are transient, how
long to wait, and when to give up.

Transient: HTTP 429, 5xx, 408/409, timeouts, dropped connections, and malformed response bodies (a proxy
or an overloaded server answering 200 with garbage). Waits honour the server's ``Retry-After`` (or
``retry-after-ms``) header, else back off exponentially with jitter. Everything else (400, 401, 403, 404)
fails at once: sending the same request again cannot fix it. A call gives up after ``max_retries`` retries
or when its deadline would pass before the next attempt could start, whichever comes first, so a hung
endpoint costs at most the deadline.
"""

from __future__ import annotations

import email.utils
import math
import time
from datetime import UTC
from typing import Any

import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    stop_never,
)
from tenacity.wait import wait_random_exponential

from governed_ai.core.errors import MalformedResponse

MAX_RETRY_AFTER_S = 120.0


def is_transient(error: BaseException) -> bool:
    """Whether the same request may succeed if sent again."""
    if isinstance(error, MalformedResponse | openai.APITimeoutError | openai.APIConnectionError):
        return True
    if isinstance(error, TimeoutError):  # the per-call deadline cut an attempt short
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in (408, 409, 429) or error.status_code >= 500
    return False


def retry_after_seconds(error: BaseException, now: float | None = None) -> float | None:
    """The wait the server asked for, from ``retry-after-ms`` or ``Retry-After`` (seconds or a date).

    Capped at ``MAX_RETRY_AFTER_S`` and never negative; unparsable or non-finite values count as absent.
    """
    response = getattr(error, "response", None)
    headers: Any = getattr(response, "headers", None)
    if not headers:
        return None
    millis = _finite(headers.get("retry-after-ms"))
    if millis is not None:
        return _clamp(millis / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return _clamp(seconds)
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:  # "-0000": the date is in UTC, not local time
        parsed = parsed.replace(tzinfo=UTC)
    return _clamp(parsed.timestamp() - (time.time() if now is None else now))


def _finite(value: str | None) -> float | None:
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _clamp(seconds: float) -> float:
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class _WaitHonouringRetryAfter:
    def __init__(self, initial: float, maximum: float) -> None:
        self._backoff = wait_random_exponential(multiplier=initial, max=maximum)

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        asked = retry_after_seconds(error) if error is not None else None
        return asked if asked is not None else float(self._backoff(state))


def request_retrying(
    max_retries: int,
    *,
    deadline_seconds: float | None = None,
    initial_wait: float = 0.5,
    max_wait: float = 30.0,
) -> AsyncRetrying:
    """A tenacity controller for one request (re-raises the last error when it gives up)."""
    # stop_before_delay: do not start a wait that would end past the deadline.
    stop = stop_after_attempt(max_retries + 1) | (
        stop_before_delay(deadline_seconds) if deadline_seconds is not None else stop_never
    )
    wait = _WaitHonouringRetryAfter(initial_wait, max_wait)
    retry = retry_if_exception(is_transient)
    # Handed over as plain functions: tenacity asks inspect.iscoroutinefunction() of each strategy on every
    # attempt, which is cheap for a function and ~20 us for a callable object, several times per request.
    return AsyncRetrying(
        stop=lambda state: stop(state),
        wait=lambda state: wait(state),
        retry=lambda state: retry(state),
        reraise=True,
    )
