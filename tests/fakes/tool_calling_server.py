"""ToolCallingServer: the FakeOpenAIServer (a real HTTP server with scripted replies) plus scripted
``tool_calls``, for exact control of which tools an agent's "model" asks for.

A fake model, named as one: tests against a real model use the ``local_model`` fixture.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply


@dataclass
class ScriptedToolCalls(ScriptedReply):
    """A reply that calls tools: ``calls`` are ``(name, arguments)``; arguments may be a dict (sent as JSON
    text, as the API does) or a raw string (to script malformed JSON)."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    finish_reason: str = "tool_calls"


def tool_calls(*calls: tuple[str, Any]) -> ScriptedToolCalls:
    """A native reply calling ``calls`` in order."""
    return ScriptedToolCalls(calls=list(calls))


def choose(tool: str, **arguments: Any) -> str:
    """A constrained-mode reply (JSON content) choosing ``tool`` with ``arguments``."""
    return json.dumps({"tool": tool, "arguments": arguments})


def final(answer: Any) -> str:
    """A constrained-mode reply giving the final answer."""
    return json.dumps({"tool": "final", "answer": answer})


class ToolCallingServer(FakeOpenAIServer):
    """FakeOpenAIServer whose chat replies may carry ``tool_calls`` (see :class:`ScriptedToolCalls`)."""

    def tools_offered(self) -> list[list[str]]:
        """For each chat request, the names of the tools it offered (native mode)."""
        return [[t["function"]["name"] for t in r.get("tools") or ()] for r in self.chat_requests]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        base: Any = super()._handler()
        fake = self

        class Handler(base):  # type: ignore[misc,valid-type]
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.requests.append(body)
                    fake.paths.append(self.path)
                reply = fake._next_reply()
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.raw_body is not None or reply.status != 200:
                    error = {"error": {"message": reply.content or f"HTTP {reply.status}", "type": "fake"}}
                    payload = reply.raw_body if reply.raw_body is not None else json.dumps(error).encode()
                    self._send(reply.status, payload, reply.headers)
                    return
                message: dict[str, Any] = {"role": "assistant", "content": reply.content}
                if isinstance(reply, ScriptedToolCalls):
                    message["tool_calls"] = [
                        {
                            "id": f"call_{len(fake.requests)}_{index}",
                            "type": "function",
                            "function": {
                                "name": name,
                                "arguments": arguments
                                if isinstance(arguments, str)
                                else json.dumps(arguments),
                            },
                        }
                        for index, (name, arguments) in enumerate(reply.calls)
                    ]
                completion = {
                    "id": f"chatcmpl-fake-{len(fake.requests)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "fake-model"),
                    "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
                    "usage": {
                        "prompt_tokens": reply.prompt_tokens,
                        "completion_tokens": reply.completion_tokens,
                        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                    },
                }
                self._send(200, json.dumps(completion).encode(), reply.headers)

        return Handler
