"""Per-item retries for batch calls: which failures are transient, and how long to wait.

Transient: HTTP 429, 5xx, 408/409, timeouts, dropped connections, and malformed response bodies (a proxy
or an overloaded server answering 200 with garbage). Waits honour the server's ``Retry-After`` (or
``retry-after-ms``) header, else back off exponentially with jitter. Everything else (400, 401, 404, a
reply that does not fit the schema after repairs) fails the item at once: retrying cannot fix it.
"""

from __future__ import annotations

import email.utils
import math
import time
from datetime import UTC
from typing import Any

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

MAX_RETRY_AFTER_S = 120.0


class MalformedResponse(RuntimeError):
    """The endpoint answered, but the body is not a usable chat completion."""


def is_transient(error: BaseException) -> bool:
    if isinstance(error, MalformedResponse | openai.APITimeoutError | openai.APIConnectionError):
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


def item_retrying(max_attempts: int, *, initial_wait: float = 0.5, max_wait: float = 30.0) -> AsyncRetrying:
    """A tenacity controller for one HTTP exchange of one item (re-raises the last error when exhausted)."""
    return AsyncRetrying(
        stop=stop_after_attempt(max_attempts),
        wait=_WaitHonouringRetryAfter(initial_wait, max_wait),
        retry=retry_if_exception(is_transient),
        reraise=True,
    )
