"""FaultyFakeOpenAIServer: a fake OpenAI-compatible model server with fixed latency and injected faults.

A named fake for throughput benchmarks and reliability tests, not a model: every successful reply is a
canned completion. It speaks HTTP/1.1 with keep-alive on asyncio (so one process serves hundreds of
requests per second), answers ``POST /v1/chat/completions`` after a fixed latency and ``GET /v1/models``
at once, and injects faults at a configured rate:

- ``429`` with ``Retry-After`` (seconds) and ``retry-after-ms`` headers, as OpenAI sends them;
- ``500``;
- ``timeout``: the reply is held longer than the client's timeout, then a 504 is sent (never a success);
- ``malformed``: HTTP 200 with a body that is not a usable chat completion (HTML, truncated JSON, or
  JSON without ``choices``).

Which requests fail is reproducible: the decision is a hash of the seed, the item key and how many
requests that item has made so far, so it does not depend on the order concurrent requests arrive in.
The item key is found in the prompt with ``key_pattern`` (default: ``[key=...]``, i.e. the template
contains ``[key={{ item.id }}]``).

It counts, per item key, the successful completions it served and the tokens they used (``GET /stats``
or :meth:`stats`), which is what "nothing is paid for twice" and "the ledger equals what was served" are
checked against. With ``record_bodies`` it also keeps every request body it received (path and raw
text, :meth:`FaultyFakeOpenAIServer.request_bodies`), which is what "nothing secret left the task" is
checked against. ``POST /v1/embeddings`` answers with deterministic vectors (a hash of each input), never
faulted.

A request with a JSON schema in ``response_format`` (either dialect, ``json_schema`` or ``json_object``
with ``schema``) gets JSON that matches the schema, as from a grammar-constrained server (see
:mod:`tests.fakes.schema_instance`); a plain ``json_object`` request gets ``{"key": ..., "label": ...}``.

In-process::

    with FaultyFakeOpenAIServer(FaultConfig(latency_ms=5, fault_rate=0.2, seed=7)) as server:
        server.base_url, server.stats()

As a subprocess (prints its port on the first line of stdout)::

    python -m tests.fakes.fault_server --port 0 --latency-ms 50 --fault-rate 0.2 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes.schema_instance import instance_for

FAULT_KINDS = ("429", "500", "timeout", "malformed")
DEFAULT_KEY_PATTERN = r"\[key=([^\]]+)\]"
_NO_KEY = "<no key>"

_MALFORMED_BODIES: tuple[tuple[str, bytes], ...] = (
    ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    ("application/json", b'{"id": "chatcmpl-cut", "object": "chat.completion", "choices": [{"ind'),
    ("application/json", b'{"id": "chatcmpl-empty", "object": "chat.completion", "model": "fake"}'),
)


@dataclass(frozen=True)
class FaultConfig:
    """How the fake behaves. ``fault_rate`` is the chance that any one chat request fails."""

    latency_ms: float = 50.0
    fault_rate: float = 0.0
    seed: int = 0
    kinds: tuple[str, ...] = FAULT_KINDS
    retry_after_s: float = 0.05
    timeout_hold_s: float = 2.0
    models: tuple[str, ...] = ("fake-model",)
    key_pattern: str = DEFAULT_KEY_PATTERN
    completion_tokens: int = 5
    record_bodies: bool = False
    embedding_dimensions: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within 0..1, got {self.fault_rate}")
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}, got {self.kinds}")


@dataclass
class _Stats:
    requests: int = 0
    chat_requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    successes: Counter[str] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)
    attempts: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "chat_requests": self.chat_requests,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "successes": dict(self.successes),
            "tokens": dict(self.tokens),
            "attempts": dict(self.attempts),
            "faults": dict(self.faults),
        }


def fault_for(config: FaultConfig, key: str, attempt: int) -> str | None:
    """The fault (or None) for ``key``'s ``attempt``-th request: a pure function of the seed."""
    if config.fault_rate <= 0:
        return None
    digest = hashlib.sha256(f"{config.seed}|{key}|{attempt}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    if draw >= config.fault_rate:
        return None
    return config.kinds[digest[8] % len(config.kinds)]


class _Protocol:
    """The request handling; one instance per server, shared by every connection."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.stats = _Stats()
        self._key_pattern = re.compile(config.key_pattern)
        self._lock = threading.Lock()  # stats are read from other threads
        self.bodies: list[tuple[str, str]] = []

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self.stats.snapshot()

    def reset(self) -> None:
        with self._lock:
            self.stats = _Stats()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                status, reply_headers, payload = await self._respond(method, path, body)
                head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
                reply_headers.setdefault("Content-Type", "application/json")
                reply_headers["Content-Length"] = str(len(payload))
                head.extend(f"{k}: {v}" for k, v in reply_headers.items())
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return  # the client went away (e.g. it timed out, or was killed)
        except asyncio.CancelledError:
            return  # the server is stopping while this request was held
        finally:
            writer.close()

    async def _respond(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.stats.requests += 1
            if self.config.record_bodies and body:
                self.bodies.append((path, body.decode("utf-8", errors="replace")))
        if method == "GET" and path.rstrip("/").endswith("/models"):
            models = [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.config.models
            ]
            return 200, {}, json.dumps({"object": "list", "data": models}).encode()
        if method == "GET" and path.rstrip("/").endswith("/stats"):
            return 200, {}, json.dumps(self.snapshot()).encode()
        if method == "POST" and path.rstrip("/").endswith("/reset"):
            self.reset()
            return 200, {}, b"{}"
        if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
            return await self._chat(json.loads(body or b"{}"))
        if method == "POST" and path.rstrip("/").endswith("/embeddings"):
            return self._embeddings(json.loads(body or b"{}"))
        return 404, {}, b'{"error": {"message": "not found", "type": "fake"}}'

    async def _chat(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        prompt = "\n".join(str(m.get("content") or "") for m in request.get("messages") or [])
        found = self._key_pattern.search(prompt)
        key = found.group(1) if found else _NO_KEY
        with self._lock:
            self.stats.chat_requests += 1
            self.stats.in_flight += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
            self.stats.attempts[key] += 1
            attempt = self.stats.attempts[key]
        try:
            fault = fault_for(self.config, key, attempt)
            if fault is not None:
                with self._lock:
                    self.stats.faults[fault] += 1
            if fault == "timeout":
                await asyncio.sleep(self.config.timeout_hold_s)
            else:
                await asyncio.sleep(self.config.latency_ms / 1000)
            reply = self._reply(fault, key, attempt, request, prompt)
            if fault is None:
                with self._lock:  # counted when the completion is handed to the connection
                    self.stats.successes[key] += 1
                    self.stats.tokens[key] += _prompt_tokens(prompt) + self.config.completion_tokens
            return reply
        finally:
            with self._lock:
                self.stats.in_flight -= 1

    def _embeddings(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        inputs = request.get("input") or []
        texts = [inputs] if isinstance(inputs, str) else [str(text) for text in inputs]
        data = []
        for index, text in enumerate(texts):
            digest = hashlib.sha256(text.encode()).digest()
            vector = [
                (digest[i % len(digest)] - 127.5) / 127.5 for i in range(self.config.embedding_dimensions)
            ]
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(_prompt_tokens(text) for text in texts)
        body = {
            "object": "list",
            "data": data,
            "model": request.get("model", self.config.models[0]),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return 200, {}, json.dumps(body).encode()

    def _reply(
        self, fault: str | None, key: str, attempt: int, request: dict[str, Any], prompt: str
    ) -> tuple[int, dict[str, str], bytes]:
        if fault == "429":
            wait = self.config.retry_after_s
            headers = {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(int(wait * 1000))}
            return 429, headers, b'{"error": {"message": "Rate limit reached (fake)", "type": "requests"}}'
        if fault == "500":
            return 500, {}, b'{"error": {"message": "The server had an error (fake)", "type": "server"}}'
        if fault == "timeout":
            return 504, {}, b'{"error": {"message": "held past the client timeout (fake)"}}'
        if fault == "malformed":
            variant = zlib.crc32(f"{key}|{attempt}".encode()) % len(_MALFORMED_BODIES)
            content_type, payload = _MALFORMED_BODIES[variant]
            return 200, {"Content-Type": content_type}, payload
        response_format = request.get("response_format") or {}
        schema = (response_format.get("json_schema") or {}).get("schema") or response_format.get("schema")
        if schema:
            text = "fake reply from the fault server" if key == _NO_KEY else f"fake reply for {key}"
            content = json.dumps(instance_for(schema, text))
        elif response_format:
            content = json.dumps({"key": key, "label": "positive"})
        else:
            content = f"positive [key={key}]"
        prompt_tokens = _prompt_tokens(prompt)
        completion = {
            "id": f"chatcmpl-fault-{key}-{attempt}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.config.models[0]),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": self.config.completion_tokens,
                "total_tokens": prompt_tokens + self.config.completion_tokens,
            },
        }
        return 200, {}, json.dumps(completion).encode()


def _prompt_tokens(prompt: str) -> int:
    return max(1, len(prompt) // 4)


_REASONS = {
    200: "OK",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    504: "Gateway Timeout",
}


class FaultyFakeOpenAIServer:
    """The fake, served from a background thread of this process (see the module docstring)."""

    def __init__(self, config: FaultConfig | None = None, *, port: int = 0) -> None:
        self.config = config or FaultConfig()
        self._protocol = _Protocol(self.config)
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-server", daemon=True)

    @property
    def port(self) -> int:
        assert self._server is not None, "start the server first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def connection_json(self, **extra: Any) -> str:
        """An ``AIRFLOW_CONN_*`` value pointing a ``governed_ai_llm`` connection here."""
        return json.dumps(
            {"conn_type": "governed_ai_llm", "host": self.base_url, "password": "fake-key", "extra": extra}
        )

    def stats(self) -> dict[str, Any]:
        """Requests, in-flight requests, faults by kind, and per item key: attempts and successes."""
        return self._protocol.snapshot()

    def reset_stats(self) -> None:
        self._protocol.reset()

    def request_bodies(self) -> list[tuple[str, str]]:
        """``(path, body text)`` of every request with a body, in arrival order (``record_bodies`` only)."""
        with self._protocol._lock:
            return list(self._protocol.bodies)

    def start(self) -> FaultyFakeOpenAIServer:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._protocol.serve, "127.0.0.1", self._port, backlog=1024), self._loop
        )
        self._server = started.result(timeout=10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                # Handlers still holding a request (e.g. a "timeout") are cancelled, not awaited.
                held = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
                for task in held:
                    task.cancel()
                await asyncio.gather(*held, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FaultyFakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FaultServerProcess:
    """The fake in a subprocess (so it does not share this process's CPU time or GIL)."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.config = config or FaultConfig()
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def connection_json(self, **extra: Any) -> str:
        return json.dumps(
            {"conn_type": "governed_ai_llm", "host": self.base_url, "password": "fake-key", "extra": extra}
        )

    def command(self) -> list[str]:
        c = self.config
        return [
            sys.executable, "-m", "tests.fakes.fault_server", "--port", "0",
            "--latency-ms", str(c.latency_ms), "--fault-rate", str(c.fault_rate), "--seed", str(c.seed),
            "--kinds", ",".join(c.kinds), "--retry-after-s", str(c.retry_after_s),
            "--timeout-hold-s", str(c.timeout_hold_s), "--models", ",".join(c.models),
            "--key-pattern", c.key_pattern,
        ]  # fmt: skip

    def start(self) -> FaultServerProcess:
        repo = Path(__file__).resolve().parents[2]
        self._process = subprocess.Popen(
            self.command(), cwd=repo, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"fault server did not print its port (got {line!r})")
        self.port = int(line)
        return self

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/stats", timeout=10) as response:
            return dict(json.loads(response.read()))

    def reset_stats(self) -> None:
        request = urllib.request.Request(f"{self.base_url}/reset", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> FaultServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse_args(argv: list[str] | None) -> tuple[FaultConfig, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kinds", default=",".join(FAULT_KINDS), help="comma-separated subset of " + ",".join(FAULT_KINDS)
    )
    parser.add_argument("--retry-after-s", type=float, default=0.05)
    parser.add_argument("--timeout-hold-s", type=float, default=2.0)
    parser.add_argument("--models", default="fake-model")
    parser.add_argument("--key-pattern", default=DEFAULT_KEY_PATTERN)
    args = parser.parse_args(argv)
    config = FaultConfig(
        latency_ms=args.latency_ms,
        fault_rate=args.fault_rate,
        seed=args.seed,
        kinds=tuple(k for k in args.kinds.split(",") if k),
        retry_after_s=args.retry_after_s,
        timeout_hold_s=args.timeout_hold_s,
        models=tuple(m for m in args.models.split(",") if m),
        key_pattern=args.key_pattern,
    )
    return config, args.port


async def _serve_forever(config: FaultConfig, port: int) -> None:
    protocol = _Protocol(config)
    server = await asyncio.start_server(protocol.serve, "127.0.0.1", port, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    config, port = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(config, port))
    return 0


__all__ = ["FAULT_KINDS", "FaultConfig", "FaultServerProcess", "FaultyFakeOpenAIServer", "fault_for"]

if __name__ == "__main__":
    raise SystemExit(main())
