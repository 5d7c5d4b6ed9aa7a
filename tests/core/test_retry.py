"""The one retry policy: transient vs permanent errors, Retry-After, waits, attempts and the deadline.

The errors are real: they come from the openai SDK talking HTTP to FakeOpenAIServer (or to a closed
port), so the classification is checked against what the SDK really raises.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from governed_ai.core.errors import MalformedResponse
from governed_ai.core.retry import (
    MAX_RETRY_AFTER_S,
    is_transient,
    request_retrying,
    retry_after_seconds,
)
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


def error_from(server: FakeOpenAIServer, reply: ScriptedReply, *, timeout: float = 5.0) -> BaseException:
    """The exception the SDK raises for one scripted reply."""
    server.replies.clear()
    server.script(reply)
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=timeout)
    try:
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
    except Exception as error:
        return error
    finally:
        client.close()
    raise AssertionError(f"the reply {reply} did not raise")


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 408, 409])
def test_rate_limits_server_errors_and_request_timeouts_are_transient(server, status):
    error = error_from(server, ScriptedReply(status=status))
    assert isinstance(error, openai.APIStatusError) and error.status_code == status
    assert is_transient(error)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_permanent(server, status):
    error = error_from(server, ScriptedReply(status=status))
    assert isinstance(error, openai.APIStatusError) and error.status_code == status
    assert not is_transient(error)


def test_a_client_side_timeout_is_transient(server):
    error = error_from(server, ScriptedReply(content="late", delay_s=1.0), timeout=0.2)
    assert isinstance(error, openai.APITimeoutError)
    assert is_transient(error)


def test_a_refused_connection_is_transient():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIConnectionError) as raised:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert is_transient(raised.value)


def test_malformed_bodies_are_transient_other_errors_are_not(server):
    error = error_from(server, ScriptedReply(raw_body=b'{"choices": [{"ind'))
    assert isinstance(error, json.JSONDecodeError)  # what the runner turns into MalformedResponse
    assert is_transient(MalformedResponse("body is not JSON"))
    assert not is_transient(error)  # only once wrapped: a JSONDecodeError elsewhere is a bug, not the server
    assert not is_transient(ValueError("schema mismatch"))
    assert not is_transient(PermissionError("denied"))


def test_retry_after_in_seconds_ms_and_http_date(server):
    seconds = error_from(server, ScriptedReply(status=429, headers={"Retry-After": "7"}))
    assert retry_after_seconds(seconds) == 7.0
    fractional = error_from(server, ScriptedReply(status=429, headers={"Retry-After": "0.25"}))
    assert retry_after_seconds(fractional) == 0.25
    millis = error_from(
        server, ScriptedReply(status=429, headers={"retry-after-ms": "1500", "Retry-After": "9"})
    )
    assert retry_after_seconds(millis) == 1.5  # the precise header wins
    date = email.utils.formatdate(NOW + 42, usegmt=True)
    dated = error_from(server, ScriptedReply(status=503, headers={"Retry-After": date}))
    assert retry_after_seconds(dated, now=NOW) == pytest.approx(42.0)


def test_retry_after_is_capped_never_negative_and_ignored_when_unusable(server):
    huge = error_from(server, ScriptedReply(status=429, headers={"Retry-After": "86400"}))
    assert retry_after_seconds(huge) == MAX_RETRY_AFTER_S
    past = email.utils.formatdate(NOW - 60, usegmt=True)
    assert (
        retry_after_seconds(
            error_from(server, ScriptedReply(status=429, headers={"Retry-After": past})), now=NOW
        )
        == 0.0
    )
    for bad in ("soon", "nan", "inf"):
        error = error_from(server, ScriptedReply(status=429, headers={"Retry-After": bad}))
        assert retry_after_seconds(error) is None, bad
    bad_ms = error_from(
        server, ScriptedReply(status=429, headers={"retry-after-ms": "x", "Retry-After": "3"})
    )
    assert retry_after_seconds(bad_ms) == 3.0
    plain = error_from(server, ScriptedReply(status=500))
    assert retry_after_seconds(plain) is None
    assert retry_after_seconds(ValueError("no response at all")) is None


def run_with_recorded_sleeps(
    errors: list[BaseException | None], max_attempts: int, deadline_seconds: float | None = None
) -> tuple[Any, list[float]]:
    """Drive request_retrying over scripted outcomes, recording the waits instead of sleeping."""
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> str:
        controller = request_retrying(
            max_attempts - 1, deadline_seconds=deadline_seconds, initial_wait=0.5, max_wait=30.0
        )
        controller.sleep = record  # tenacity's own hook: no wall-clock waits in tests
        outcomes = iter(errors)
        async for attempt in controller:
            with attempt:
                error = next(outcomes)
                if error is not None:
                    raise error
                return "done"
        raise AssertionError("unreachable")

    return asyncio.run(main()), slept


def test_waits_honour_retry_after_and_back_off_without_it(server):
    asked = error_from(server, ScriptedReply(status=429, headers={"retry-after-ms": "1234"}))
    plain = error_from(server, ScriptedReply(status=500))
    result, slept = run_with_recorded_sleeps([asked, plain, plain, None], max_attempts=4)
    assert result == "done"
    assert slept[0] == 1.234
    # Exponential with full jitter: within [0, 0.5 * 2**(n-1)] for the n-th retry.
    assert 0 <= slept[1] <= 1.0 and 0 <= slept[2] <= 2.0
    assert len(slept) == 3


def test_permanent_errors_are_not_retried_and_exhaustion_reraises_the_last_error(server):
    forbidden = error_from(server, ScriptedReply(status=401))
    with pytest.raises(openai.AuthenticationError):
        run_with_recorded_sleeps([forbidden, None], max_attempts=4)
    malformed = [MalformedResponse(f"bad body {i}") for i in range(3)]
    with pytest.raises(MalformedResponse, match="bad body 2"):
        run_with_recorded_sleeps([*malformed, None], max_attempts=3)


def test_no_wait_starts_that_would_end_past_the_deadline(server):
    asked = error_from(server, ScriptedReply(status=429, headers={"retry-after": "100"}))
    with pytest.raises(openai.RateLimitError):  # a 100 s wait does not fit a 5 s deadline
        run_with_recorded_sleeps([asked, None], max_attempts=10, deadline_seconds=5.0)
    short = error_from(server, ScriptedReply(status=429, headers={"retry-after-ms": "100"}))
    result, slept = run_with_recorded_sleeps([short, None], max_attempts=10, deadline_seconds=5.0)
    assert (result, slept) == ("done", [0.1])
