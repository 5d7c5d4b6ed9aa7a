"""The transport against a real HTTP server (FakeOpenAIServer): what it sends, how failures come back.

Requests go out through aiohttp directly, not through the SDK's ``post``; these tests pin down that the
endpoint still sees what the SDK would send (its headers and authentication) and that every failure still
becomes the SDK's typed error, so the one retry policy and the error messages behave as they did.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from governed_ai.core.errors import EndpointRejected, ModelNotServed, ModelUnavailable
from governed_ai.core.llm_settings import LLMConnectionSettings
from governed_ai.core.transport import Completion, ModelTransport, Sent
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


def chat(settings: LLMConnectionSettings, body: dict[str, Any] = BODY) -> Sent[Completion]:
    async def go() -> Sent[Completion]:
        transport = ModelTransport(settings, connection_id="llm")
        try:
            return await transport.chat(body)
        finally:
            await transport.aclose()

    return asyncio.run(go())


def settings_for(server: FakeOpenAIServer, **fields: Any) -> LLMConnectionSettings:
    return LLMConnectionSettings(base_url=server.base_url, api_key="sk-test-key", **fields)


def test_the_endpoint_gets_the_body_as_given_with_the_sdks_headers_and_key(server):
    settings = settings_for(server, organization="org-1", project="proj-1")
    sent = chat(settings)
    assert sent.result.content == "ok" and sent.http_attempts == 1
    assert server.requests == [BODY]
    headers = {name.lower(): value for name, value in server.headers[0].items()}
    assert headers["authorization"] == "Bearer sk-test-key"
    assert headers["openai-organization"] == "org-1"
    assert headers["openai-project"] == "proj-1"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("AsyncOpenAI/Python")


def test_a_server_error_is_retried_and_the_attempts_are_counted(server):
    server.script(
        ScriptedReply(status=503), ScriptedReply(status=429, headers={"retry-after-ms": "10"}), "fine"
    )
    sent = chat(settings_for(server, max_retries=3))
    assert sent.result.content == "fine" and sent.http_attempts == 3
    assert len(server.chat_requests) == 3


def test_a_malformed_body_is_retried_like_a_server_error(server):
    server.script(ScriptedReply(raw_body=b"<html>gateway</html>"), "fine")
    sent = chat(settings_for(server, max_retries=2))
    assert sent.result.content == "fine" and sent.http_attempts == 2


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_fails_at_once_with_what_to_do(server, status):
    server.script(ScriptedReply(status=status, content="bad key"))
    with pytest.raises(EndpointRejected, match=f"HTTP {status}.*password field") as raised:
        chat(settings_for(server, max_retries=3))
    assert raised.value.http_attempts == 1 and len(server.chat_requests) == 1


def test_a_bad_request_names_the_model_and_the_servers_message(server):
    server.script(ScriptedReply(status=400, content="response_format is not supported"))
    with pytest.raises(EndpointRejected, match="'fake-model'.*HTTP 400.*response_format is not supported"):
        chat(settings_for(server, max_retries=3))


def test_an_unknown_model_is_model_not_served(server):
    server.script(ScriptedReply(status=404, content="no such model"))
    with pytest.raises(ModelNotServed, match="404 for model 'fake-model'"):
        chat(settings_for(server, max_retries=3))


def test_a_slow_server_times_out_and_is_retried_then_given_up(server):
    server.script(ScriptedReply(content="late", delay_s=1.0), ScriptedReply(content="late", delay_s=1.0))
    with pytest.raises(ModelUnavailable, match="after 2 attempt.*transient APITimeoutError") as raised:
        chat(settings_for(server, timeout=0.2, max_retries=1))
    assert raised.value.http_attempts == 2


def test_a_refused_connection_is_transient_and_given_up_after_the_retries():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = LLMConnectionSettings(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(ModelUnavailable, match="after 2 attempt.*transient APIConnectionError") as raised:
        chat(settings)
    assert raised.value.http_attempts == 2


def test_embeddings_come_back_in_input_order_with_their_token_count(server):
    async def go() -> Any:
        transport = ModelTransport(settings_for(server), connection_id="llm")
        try:
            return await transport.embed("fake-embed", ["one", "two", "three"])
        finally:
            await transport.aclose()

    sent = asyncio.run(go())
    assert sent.result.vectors.shape[0] == 3
    assert server.paths[-1].endswith("/embeddings")


class _RecordingProxy:
    """A minimal HTTP forward proxy: records each request line it is asked to forward and answers a
    canned chat completion itself (it never reaches the named host)."""

    REPLY = (
        b'{"id":"x","object":"chat.completion","created":0,"model":"fake-model","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"via proxy"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
    )

    def __init__(self) -> None:
        self.request_lines: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.request_lines.append(lines[0])
        length = next(
            int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length")
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(self.REPLY)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + self.REPLY
        )
        await writer.drain()
        writer.close()


@pytest.mark.parametrize("bypassed", [False, True])
def test_the_environments_proxy_is_used_unless_no_proxy_names_the_host(monkeypatch, bypassed):
    proxy = _RecordingProxy()
    endpoint = "http://llm.internal.example:8080/v1"
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "llm.internal.example" if bypassed else "")
    monkeypatch.setenv("no_proxy", "llm.internal.example" if bypassed else "")

    async def go() -> str:
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
        transport = ModelTransport(
            LLMConnectionSettings(base_url=endpoint, api_key="sk-test-key", timeout=2, max_retries=0),
            connection_id="llm",
        )
        try:
            return (await transport.chat(BODY)).result.content or ""
        except ModelUnavailable as error:  # bypassed: the made-up host does not resolve
            return f"failed: {error}"
        finally:
            await transport.aclose()
            server.close()

    outcome = asyncio.run(go())
    if bypassed:
        assert outcome.startswith("failed") and proxy.request_lines == []
    else:
        assert outcome == "via proxy"
        assert proxy.request_lines == [f"POST {endpoint}/chat/completions HTTP/1.1"]
