"""OpenAI SDK clients whose only way out is the governed client: plain SDK code, governed.

Code the provider does not write (a ``@task`` that uses the ``openai`` SDK, a pydantic-ai agent, the
common-ai operators) speaks the OpenAI HTTP API. Instead of a second path to the model, such code gets an
``openai.OpenAI`` / ``openai.AsyncOpenAI`` whose HTTP transport is :class:`OpenAIGateway`: every request
the SDK would send is handed, in-process, to :class:`~governed_ai.core.client.GovernedClient` (authorize,
route, redact, journal replay, budgets, audit; see :mod:`governed_ai.core.client`), and the governed
result is answered in the OpenAI response shape. Nothing here opens a socket; the placeholder base URL
(``.invalid``, which never resolves) and key are never used to reach anything.

Accepted: ``POST .../chat/completions`` (messages, tools and tool calls, ``response_format``, sampling
settings; ``max_tokens``/``max_completion_tokens`` are capped by the policy like any governed call) and
``POST .../embeddings`` (text inputs, ``float`` or ``base64`` encoding). Refused with an OpenAI-shaped
4xx error, audited as a ``deny`` (action ``openai.request``), never passed through: streaming, ``n`` > 1,
logprobs, provider-side storage, audio, predicted outputs, web search, legacy ``functions``, token-array
embedding inputs, ``dimensions``, and every other endpoint. The response carries the governance outcome
in an extra ``governed_ai`` field (rule, replayed, redactions, cost).

Governance errors become HTTP errors the SDK raises as its own typed exceptions, with the provider's
message: a policy or budget refusal is ``403`` (``openai.PermissionDeniedError``), invalid input ``400``,
a model the endpoint does not serve ``404``, an endpoint that kept failing ``502``; every error response
says ``x-should-retry: false`` because the governed client already retried what can be retried.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import openai
import orjson
from pydantic import ValidationError

from governed_ai.core.audit import AuditRecord
from governed_ai.core.client import GovernedClient
from governed_ai.core.errors import (
    ConfigurationError,
    EndpointRejected,
    GovernanceDenied,
    GovernanceUnavailable,
    InvalidInput,
    ModelCallError,
    ModelNotServed,
)
from governed_ai.core.tools.native import ToolChatRequest
from governed_ai.core.transport import http_library

#: Where the SDK clients "send" requests: a name that never resolves (RFC 2606), so nothing can leave.
GATEWAY_BASE_URL = "http://governed-ai.invalid/v1"
_PLACEHOLDER_KEY = "governed-ai-no-key"  # the SDK wants one; the endpoint's key stays in the connection

# Chat fields sent to the endpoint as given (the policy does not depend on them).
_CHAT_PASSTHROUGH = frozenset(
    {
        "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "response_format",
        "tools", "tool_choice", "parallel_tool_calls", "user", "reasoning_effort", "service_tier",
        "metadata", "verbosity", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
    }
)  # fmt: skip
# Fields the gateway reads itself.
_CHAT_OWN = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "n",
    }
)
# Fields refused because the governed path cannot keep its promises with them.
_CHAT_REFUSED: Mapping[str, str] = {
    "logprobs": "log probabilities are not kept by the governed path",
    "top_logprobs": "log probabilities are not kept by the governed path",
    "store": "storing completions at the provider is outside the governed audit trail",
    "audio": "audio output is not governed",
    "modalities": "only text output is governed",
    "prediction": "predicted outputs are not governed",
    "web_search_options": "web search is a tool outside the policy's tool grants",
    "functions": "legacy 'functions' are not supported: use 'tools'",
    "function_call": "legacy 'function_call' is not supported: use 'tool_choice'",
    "moderation": "provider-side moderation settings are not supported",
}
#: The SDK client types handed out (for annotations in modules that must not import the SDK themselves).
OpenAI = openai.OpenAI
AsyncOpenAI = openai.AsyncOpenAI
_EMBED_FIELDS = frozenset({"model", "input", "encoding_format", "user"})


class UnsupportedRequest(InvalidInput):
    """A request the governed path does not accept (streaming, n > 1, another endpoint, ...)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _status_for(error: BaseException) -> tuple[int, str]:
    """The HTTP status and OpenAI error ``type`` a governed failure is answered with."""
    if isinstance(error, UnsupportedRequest):
        return error.status, "invalid_request_error"
    if isinstance(error, GovernanceDenied):
        return 403, "governance_denied"
    if isinstance(error, ConfigurationError | InvalidInput):
        return 400, "invalid_request_error"
    if isinstance(error, ModelNotServed):
        return 404, "model_not_served"
    if isinstance(error, EndpointRejected):
        return 400, "endpoint_rejected"
    if isinstance(error, GovernanceUnavailable):
        return 503, "governance_unavailable"
    if isinstance(error, ModelCallError):
        return 502, "model_unavailable"
    return 500, "governed_ai_error"


def error_body(error: BaseException, message: str) -> tuple[int, dict[str, Any]]:
    status, kind = _status_for(error)
    permanent = bool(getattr(error, "permanent", True))
    return status, {
        "error": {
            "message": message,
            "type": kind,
            "code": type(error).__name__,
            "param": None,
            "permanent": permanent,
        }
    }


class OpenAIGateway:
    """Answers OpenAI API requests with governed calls of one :class:`GovernedClient` (one task).

    :param client: the governed client of the running task.
    :param owns_client: close ``client`` when the gateway is closed (the SDK client's ``close()``).
    """

    def __init__(self, client: GovernedClient, *, owns_client: bool = True) -> None:
        self.client = client
        self.owns_client = owns_client
        self.closed = False
        self._close_lock = threading.Lock()
        _OPEN_GATEWAYS.add(self)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the governed client (settle budget blocks, flush journal and audit writes) if owned."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        _OPEN_GATEWAYS.discard(self)
        if self.owns_client:
            self.client.close()

    def answer(
        self, method: str, path: str, body: bytes
    ) -> concurrent.futures.Future[tuple[int, dict[str, Any]]]:
        """:meth:`handle` scheduled on the governed client's own event loop (where its connections live)."""
        if self.closed:
            message = "this governed OpenAI client is closed: make a new one with the hook's openai_client()"
            closed: concurrent.futures.Future[tuple[int, dict[str, Any]]] = concurrent.futures.Future()
            closed.set_result(error_body(ConfigurationError(message), message))
            return closed
        return self.client.submit(self.handle(method, path, body))

    # -- requests ----------------------------------------------------------------------------------------

    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """One SDK request: ``(status, JSON body)``; failures are OpenAI-shaped error bodies."""
        try:
            if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
                return 200, await self._chat(_json_object(body))
            if method == "POST" and path.rstrip("/").endswith("/embeddings"):
                return 200, await self._embeddings(_json_object(body))
            raise UnsupportedRequest(
                f"{method} {path} is not available through the governed OpenAI client: it accepts "
                "POST /chat/completions and POST /embeddings only.",
                status=404,
            )
        except UnsupportedRequest as refused:
            message = self.client.describe_error(refused).removeprefix(f"{type(refused).__name__}: ")
            await self.client.writer.write(
                records=[
                    AuditRecord.for_subject(
                        self.client.subject,
                        action="openai.request",
                        resource=f"{self.client.connection_id}{path}",
                        decision="deny",
                        outcome="unsupported",
                        error=message,
                    )
                ]
            )
            return error_body(refused, message)
        except Exception as failed:  # answered as an HTTP error, which the SDK raises as its own exception
            message = self.client.describe_error(failed).removeprefix(f"{type(failed).__name__}: ")
            return error_body(failed, message)

    async def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        request = self.chat_request(body)
        governed = await self.client.achat(request)
        result = governed.result
        message: dict[str, Any] = {"role": "assistant", "content": result.content}
        calls = (result.output or {}).get("tool_calls") if isinstance(result.output, dict) else None
        if calls:
            message["tool_calls"] = [
                {
                    "id": call.get("id"),
                    "type": "function",
                    "function": {
                        "name": call.get("name"),
                        "arguments": _arguments_text(call.get("arguments")),
                    },
                }
                for call in calls
            ]
        usage = result.usage
        return {
            "id": f"chatcmpl-governed-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": result.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": result.finish_reason or ("tool_calls" if calls else "stop"),
                    "logprobs": None,
                }
            ],
            "usage": usage.to_xcom(),
            "governed_ai": {
                **governed.governance(),
                "replayed": governed.replayed,
                "cost_usd": result.cost_usd,
            },
        }

    def chat_request(self, body: dict[str, Any]) -> ToolChatRequest:
        """The governed request for an OpenAI chat body; refuses what the governed path cannot honour."""
        if body.get("stream"):
            raise UnsupportedRequest(
                "stream=True is not supported by the governed OpenAI client: output redaction and the "
                "replay journal need the whole reply. Call without streaming (pydantic-ai: agent.run / "
                "run_sync rather than run_stream, and no event_stream_handler)."
            )
        if body.get("n") not in (None, 1):
            raise UnsupportedRequest(
                f"n={body.get('n')!r} is not supported: the governed path asks for one reply."
            )
        for field, why in _CHAT_REFUSED.items():
            if body.get(field) not in (None, False):
                raise UnsupportedRequest(f"'{field}' is not supported by the governed OpenAI client: {why}.")
        _refuse_unknown_fields("chat completion", body, _CHAT_OWN | _CHAT_PASSTHROUGH, set(_CHAT_REFUSED))
        model = _model_of(body, "a model or a policy route (e.g. 'default')")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise UnsupportedRequest("'messages' must be a non-empty list of message objects.")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        passthrough = {k: v for k, v in body.items() if k in _CHAT_PASSTHROUGH and v is not None}
        response_format = passthrough.get("response_format")
        if self.client.structured_output == "json_object" and isinstance(response_format, dict):
            passthrough["response_format"] = _json_object_format(response_format)
        # tools/tool_choice travel as given (extra_body), so a named tool_choice keeps its exact form.
        try:
            return ToolChatRequest(
                messages=messages,
                model=model,
                temperature=body.get("temperature"),
                max_tokens=max_tokens,
                extra_body=passthrough or None,
            )
        except ValidationError as invalid:
            raise UnsupportedRequest(f"invalid chat completion request: {invalid}") from None

    async def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        _refuse_unknown_fields("embeddings", body, _EMBED_FIELDS)
        model = _model_of(body, "an embedding model")
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise UnsupportedRequest(
                "'input' must be a string or a non-empty list of strings: token arrays cannot be redacted."
            )
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise UnsupportedRequest(f"encoding_format={encoding!r}: use 'float' or 'base64'.")
        governed = await self.client.aembed(texts, model=model)
        vectors = np.asarray(governed.vectors, dtype="<f4")
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": base64.b64encode(row.tobytes()).decode("ascii")
                if encoding == "base64"
                else row.astype(float).tolist(),
            }
            for index, row in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": governed.model,
            "usage": {"prompt_tokens": governed.prompt_tokens, "total_tokens": governed.prompt_tokens},
            "governed_ai": {
                "rule": governed.rule,
                "redactions": governed.redactions,
                "replayed": governed.replayed,
                "cost_usd": governed.cost_usd,
            },
        }


def _refuse_unknown_fields(
    kind: str, body: dict[str, Any], accepted: frozenset[str], refused_elsewhere: set[str] | None = None
) -> None:
    unknown = sorted(set(body) - accepted - (refused_elsewhere or set()))
    if unknown:
        raise UnsupportedRequest(
            f"unsupported {kind} field(s) {', '.join(map(repr, unknown))}: the governed OpenAI client "
            f"accepts {', '.join(sorted(accepted))}."
        )


def _model_of(body: dict[str, Any], what: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise UnsupportedRequest(f"'model' must name {what}.")
    return model


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        raise UnsupportedRequest("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise UnsupportedRequest("the request body must be a JSON object")
    return data


def _json_object_format(response_format: dict[str, Any]) -> dict[str, Any]:
    """``json_schema`` in the dialect of servers that only take ``json_object`` with a schema (the LLM
    connection's ``structured_output: json_object``)."""
    if response_format.get("type") != "json_schema":
        return response_format
    schema = (response_format.get("json_schema") or {}).get("schema")
    return {"type": "json_object", "schema": schema} if schema else {"type": "json_object"}


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments  # not JSON: handed back as the model wrote it, for the caller to report
    return orjson.dumps(arguments).decode("utf-8")


# -- SDK clients -----------------------------------------------------------------------------------------

#: Gateways not closed yet in this process; :func:`close_open_gateways` closes them when a task ends.
_OPEN_GATEWAYS: weakref.WeakSet[OpenAIGateway] = weakref.WeakSet()


def close_open_gateways() -> int:
    """Close every gateway of this process that its code left open (a task that never closed its SDK
    client); returns how many. Called when a task instance ends."""
    gateways = list(_OPEN_GATEWAYS)
    for gateway in gateways:
        gateway.close()
    return len(gateways)


def _response(status: int, payload: dict[str, Any], request: Any) -> Any:
    headers = {"content-type": "application/json"}
    if status >= 400:
        headers["x-should-retry"] = "false"
    return http_library().Response(status, headers=headers, content=orjson.dumps(payload), request=request)


@lru_cache(maxsize=1)
def _transport_classes() -> tuple[type[Any], type[Any]]:
    """Sync and async transports of the SDK's own HTTP library (httpx or httpx2), built once."""
    http = http_library()
    sync_base: Any = http.BaseTransport
    async_base: Any = http.AsyncBaseTransport

    class GovernedTransport(sync_base):
        """``openai.OpenAI``'s transport: each request is a governed call on the client's own loop."""

        def __init__(self, gateway: OpenAIGateway) -> None:
            self.gateway = gateway

        def handle_request(self, request: Any) -> Any:
            body = request.read()
            status, payload = self.gateway.answer(request.method, request.url.path, body).result()
            return _response(status, payload, request)

        def close(self) -> None:
            self.gateway.close()

    class AsyncGovernedTransport(async_base):
        """``openai.AsyncOpenAI``'s transport: the governed call runs on the governed client's loop (its
        connections belong there), awaited from the caller's loop without blocking it."""

        def __init__(self, gateway: OpenAIGateway) -> None:
            self.gateway = gateway

        async def handle_async_request(self, request: Any) -> Any:
            body = await request.aread()
            answered = self.gateway.answer(request.method, request.url.path, body)
            status, payload = await asyncio.wrap_future(answered)
            return _response(status, payload, request)

        async def aclose(self) -> None:
            await asyncio.to_thread(self.gateway.close)

    return GovernedTransport, AsyncGovernedTransport


def governed_openai_client(client: GovernedClient, *, owns_client: bool = True) -> openai.OpenAI:
    """An ``openai.OpenAI`` whose every request is a governed call of ``client`` (see the module
    docstring). Use it as a context manager or ``close()`` it: that closes ``client`` too when
    ``owns_client``."""
    transport_class, _ = _transport_classes()
    return openai.OpenAI(
        api_key=_PLACEHOLDER_KEY,
        base_url=GATEWAY_BASE_URL,
        max_retries=0,  # the governed client retried already; a refusal must not be sent again
        http_client=openai.DefaultHttpxClient(
            transport=transport_class(OpenAIGateway(client, owns_client=owns_client))
        ),
    )


def governed_async_openai_client(client: GovernedClient, *, owns_client: bool = True) -> openai.AsyncOpenAI:
    """The ``openai.AsyncOpenAI`` counterpart of :func:`governed_openai_client` (what pydantic-ai uses)."""
    _, transport_class = _transport_classes()
    return openai.AsyncOpenAI(
        api_key=_PLACEHOLDER_KEY,
        base_url=GATEWAY_BASE_URL,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(
            transport=transport_class(OpenAIGateway(client, owns_client=owns_client))
        ),
    )
