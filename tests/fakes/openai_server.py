"""FakeOpenAIServer: a real HTTP server on 127.0.0.1 that speaks enough of the OpenAI API for unit tests.

It is a fake model (scripted replies), not a mock of the SDK: requests go through the openai SDK's real
HTTP stack, so retries, headers and error mapping are exercised. Tests against a real model use the
``local_model`` fixture instead.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ScriptedReply:
    """One reply the fake will give: a chat message, or an HTTP error with optional headers/raw body."""

    content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    raw_body: bytes | None = None
    prompt_tokens: int = 10
    completion_tokens: int = 5
    finish_reason: str = "stop"
    delay_s: float = 0.0


def fake_vector(text: str, dimensions: int = 8) -> list[float]:
    """A deterministic, unnormalised stand-in vector for ``text`` (a fake, not an embedding model)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [digest[i] - 128.0 for i in range(dimensions)]


def fake_embeddings(body: dict[str, Any]) -> dict[str, Any]:
    texts = body.get("input") or []
    texts = [texts] if isinstance(texts, str) else texts
    # Returned in reverse order on purpose: clients must sort by ``index``, as the API allows any order.
    data = [{"object": "embedding", "index": i, "embedding": fake_vector(t)} for i, t in enumerate(texts)]
    return {
        "object": "list",
        "data": data[::-1],
        "model": body.get("model"),
        "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)},
    }


class FakeOpenAIServer:
    """Scripted OpenAI-compatible server. ``replies`` are consumed in order; ``default`` answers after."""

    def __init__(
        self, models: tuple[str, ...] = ("fake-model",), default: ScriptedReply | None = None
    ) -> None:
        self.models = list(models)
        self.replies: deque[ScriptedReply] = deque()
        self.default = default or ScriptedReply(content="ok")
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []  # of each POST, in order
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def connection_json(self, **extra: Any) -> str:
        return json.dumps(
            {"conn_type": "governed_ai_llm", "host": self.base_url, "password": "fake-key", "extra": extra}
        )

    def script(self, *replies: ScriptedReply | str) -> None:
        for reply in replies:
            self.replies.append(ScriptedReply(content=reply) if isinstance(reply, str) else reply)

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r, p in zip(self.requests, self.paths, strict=True) if p.endswith("/chat/completions")]

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next_reply(self) -> ScriptedReply:
        with self._lock:
            return self.replies.popleft() if self.replies else self.default

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                with fake._lock:
                    fake.requests.append({})
                    fake.paths.append(self.path)
                if self.path.endswith("/models"):
                    data = [
                        {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in fake.models
                    ]
                    self._send(200, json.dumps({"object": "list", "data": data}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.requests.append(body)
                    fake.paths.append(self.path)
                    fake.headers.append(dict(self.headers))
                if self.path.endswith("/embeddings"):
                    self._send(200, json.dumps(fake_embeddings(body)).encode())
                    return
                reply = fake._next_reply()
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.raw_body is not None or reply.status != 200:
                    error = {"error": {"message": reply.content or f"HTTP {reply.status}", "type": "fake"}}
                    payload = reply.raw_body if reply.raw_body is not None else json.dumps(error).encode()
                    self._send(reply.status, payload, reply.headers)
                    return
                completion = {
                    "id": f"chatcmpl-fake-{len(fake.requests)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "fake-model"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply.content},
                            "finish_reason": reply.finish_reason,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": reply.prompt_tokens,
                        "completion_tokens": reply.completion_tokens,
                        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                    },
                }
                self._send(200, json.dumps(completion).encode(), reply.headers)

        return Handler
