"""The transport: the only code in the package that sends requests to a model or embedding endpoint.

Everything above it (authorization, budgets, redaction, the journal, the audit trail) lives in
:class:`~governed_ai.core.client.GovernedClient`, which is the only user of this module; a test enforces
that nothing else in ``governed_ai/`` talks to the openai SDK.

The openai SDK is the source of the endpoint's configuration: its client supplies the base URL and the
headers it would send (authentication, organization/project, its user agent), and model listing goes
through it. A chat or embedding request itself is one aiohttp POST of the body as given, whose reply is
parsed here into a small :class:`Completion` (orjson). Going through the SDK's ``post`` instead costs
about 1.1 ms more CPU per request (its request options, the httpx layer over aiohttp, its auth hooks),
which is most of what a governed call would cost over a raw one on a single core. Failures become the
SDK's own typed errors (built by the SDK from the status and body), so the retry policy
(:mod:`governed_ai.core.retry`) and the error messages see exactly what the SDK would have raised.
Retries follow that one policy, with a per-request timeout and an optional per-call deadline.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Generic, TypeVar

import aiohttp
import numpy as np
import openai
import orjson
import yarl
from aiohttp.helpers import get_env_proxy_for_url
from aiolimiter import AsyncLimiter

from governed_ai.core.errors import (
    EndpointRejected,
    MalformedResponse,
    ModelCallError,
    ModelNotServed,
    ModelUnavailable,
)
from governed_ai.core.llm_settings import LLMConnectionSettings
from governed_ai.core.retry import is_transient, request_retrying

# Servers that do not check keys (local ones) still need a non-empty string for the SDK.
_NO_KEY = "no-key-configured"


@dataclass(frozen=True, slots=True)
class Completion:
    """The part of a chat completion the provider uses; also what the replay journal stores."""

    content: str | None
    finish_reason: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: tuple[dict[str, Any], ...] = ()  # {"id", "name", "arguments" (the raw JSON text)}

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "content": self.content,
            "finish_reason": self.finish_reason,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if self.tool_calls:
            data["tool_calls"] = [dict(call) for call in self.tool_calls]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        return cls(
            content=data.get("content"),
            finish_reason=data.get("finish_reason"),
            model=str(data.get("model") or ""),
            prompt_tokens=int(data.get("prompt_tokens") or 0),
            completion_tokens=int(data.get("completion_tokens") or 0),
            tool_calls=tuple(data.get("tool_calls") or ()),
        )

    @classmethod
    def from_body(cls, body: bytes, requested_model: str) -> Completion:
        """Parse a ``/chat/completions`` response body; anything unusable is :class:`MalformedResponse`."""
        try:
            data = orjson.loads(body)
            choice = data["choices"][0]
            message = choice["message"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise MalformedResponse(f"response is not a usable chat completion: {body[:200]!r}") from None
        if not isinstance(message, dict):
            raise MalformedResponse(f"response has no message object: {body[:200]!r}")
        content = message.get("content")
        usage = data.get("usage") or {}
        calls = tuple(
            {
                "id": call.get("id"),
                "name": (call.get("function") or {}).get("name"),
                "arguments": (call.get("function") or {}).get("arguments"),
            }
            for call in message.get("tool_calls") or ()
            if isinstance(call, dict)
        )
        return cls(
            content=content if isinstance(content, str) else None,
            finish_reason=choice.get("finish_reason"),
            model=str(data.get("model") or requested_model),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            tool_calls=calls,
        )


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Vectors (float32, one row per input, in input order) and the tokens the endpoint counted."""

    vectors: np.ndarray
    model: str
    prompt_tokens: int

    def to_json(self) -> dict[str, Any]:
        packed = np.ascontiguousarray(self.vectors, dtype="<f4")
        return {
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "shape": list(packed.shape),
            "vectors": base64.b64encode(packed.tobytes()).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Embeddings:
        raw = np.frombuffer(base64.b64decode(data["vectors"]), dtype="<f4")
        return cls(
            vectors=raw.reshape(tuple(data["shape"])).astype(np.float32),
            model=str(data["model"]),
            prompt_tokens=int(data["prompt_tokens"]),
        )


ResultT = TypeVar("ResultT")


@dataclass(frozen=True, slots=True)
class Sent(Generic[ResultT]):
    """What one request came to: its result, how many HTTP attempts it took and the time spent."""

    result: ResultT
    http_attempts: int
    seconds: float


@lru_cache(maxsize=1)
def http_library() -> Any:
    """The HTTP library module this openai SDK is built on (``httpx`` in 2.x, ``httpx2`` in 3.x)."""
    base = next(cls for cls in openai.DefaultAsyncHttpxClient.__mro__ if cls.__name__ == "AsyncClient")
    return importlib.import_module(base.__module__.split(".")[0])


def _env_proxy(base_url: str) -> tuple[Any, aiohttp.BasicAuth | None]:
    """The proxy (and its credentials) that ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` give for
    ``base_url``, or ``(None, None)``."""
    try:
        return get_env_proxy_for_url(yarl.URL(base_url))
    except LookupError:
        return None, None


def _http_client(timeout: float) -> Any:
    """The SDK's aiohttp-based HTTP client when its ``aiohttp`` extra is installed, else None (the SDK's
    default httpx client)."""
    try:
        return openai.DefaultAioHttpClient(timeout=timeout)
    except (RuntimeError, ImportError):  # the extra is missing: the SDK says so with a RuntimeError
        return None


def per_minute_limiter(per_minute: float, *, largest: float = 1.0) -> AsyncLimiter:
    """A limiter for ``per_minute`` units (requests or tokens) that spreads them over the minute.

    ``AsyncLimiter(per_minute, 60)`` would let a whole minute's quota go out in the first instant, and
    providers enforce per-minute limits over shorter windows (OpenAI: 60,000/min may be enforced as
    1,000/s). The bucket holds a second's share instead, or the ``largest`` single acquisition if that
    is more (a bucket smaller than one acquisition would refuse it), refilled at ``per_minute / 60``.
    """
    burst = max(per_minute / 60, largest, 1.0)
    return AsyncLimiter(burst, burst * 60 / per_minute)


class ModelTransport:
    """Requests to one OpenAI-compatible endpoint (an Airflow LLM connection), with the retry policy.

    Optional client-side rate limits (``requests_per_minute``, ``tokens_per_minute`` on the caller's
    estimate) apply to every HTTP attempt, retries included. Use from one event loop; :meth:`aclose` when
    done.
    """

    def __init__(
        self,
        settings: LLMConnectionSettings,
        *,
        connection_id: str = "llm",
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
    ) -> None:
        self.settings = settings
        self.connection_id = connection_id
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._client: openai.AsyncOpenAI | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._proxy: tuple[Any, aiohttp.BasicAuth | None] = (None, None)
        self._target_cache: tuple[str, dict[str, str]] | None = None
        self._served: list[str] | None = None
        self._served_checked = False
        self._requests = per_minute_limiter(requests_per_minute) if requests_per_minute else None
        self._tokens_per_minute = tokens_per_minute
        self._tokens: AsyncLimiter | None = None
        self.http_retries = 0

    def share(self, parts: int) -> ModelTransport:
        """A new transport to the same endpoint with ``1/parts`` of the rate limits (one of ``parts``
        processes sharing this connection's limits)."""
        return ModelTransport(
            self.settings,
            connection_id=self.connection_id,
            requests_per_minute=self.requests_per_minute / parts if self.requests_per_minute else None,
            tokens_per_minute=self.tokens_per_minute / parts if self.tokens_per_minute else None,
        )

    async def _acquire(self, estimated_tokens: int) -> None:
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens_per_minute and estimated_tokens > 0:
            if self._tokens is None or self._tokens.max_rate < estimated_tokens:
                self._tokens = per_minute_limiter(self._tokens_per_minute, largest=estimated_tokens)
            await self._tokens.acquire(min(estimated_tokens, self._tokens.max_rate))

    @property
    def where(self) -> str:
        return f"connection '{self.connection_id}' ({self.settings.base_url or 'default endpoint'})"

    def _sdk(self) -> openai.AsyncOpenAI:
        if self._client is None:
            s = self.settings
            self._client = openai.AsyncOpenAI(
                api_key=s.api_key or _NO_KEY,
                base_url=s.base_url,
                organization=s.organization,
                project=s.project,
                timeout=s.timeout,
                max_retries=0,  # retries are the retry policy's, with its deadline
                http_client=_http_client(s.timeout),
            )
        return self._client

    def _http(self) -> aiohttp.ClientSession:
        """The aiohttp session requests go through, made on (and bound to) the running event loop."""
        session, loop = self._session, asyncio.get_running_loop()
        if session is None or session.closed or self._session_loop is not loop:
            # No connection cap of its own: the caller's concurrency (and the rate limits) bound it. The
            # proxy the environment names for the endpoint is looked up here, once: with trust_env, aiohttp
            # would look it up (and parse ~/.netrc) in a thread for every request.
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), trust_env=False, skip_auto_headers=("User-Agent",)
            )
            self._session_loop = loop
            self._proxy = _env_proxy(self._target()[0])
        return session

    def _target(self) -> tuple[str, dict[str, str]]:
        """The base URL and the headers the SDK would send with a request (its defaults and
        authentication), taken from it once."""
        if self._target_cache is None:
            client = self._sdk()
            headers = {**client.default_headers, **client.auth_headers}
            self._target_cache = (
                str(client.base_url).rstrip("/"),
                {name: value for name, value in headers.items() if isinstance(value, str)},
            )
        return self._target_cache

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- requests -----------------------------------------------------------------------------------------

    async def chat(
        self, body: dict[str, Any], *, deadline_seconds: float | None = None, estimated_tokens: int = 0
    ) -> Sent[Completion]:
        """POST ``/chat/completions`` with ``body`` (model, messages, ...)."""
        model = str(body.get("model"))
        return await self._post(
            "/chat/completions", body, model, deadline_seconds, estimated_tokens,
            lambda content: Completion.from_body(content, model),
        )  # fmt: skip

    async def embed(
        self,
        model: str,
        inputs: Sequence[str],
        *,
        deadline_seconds: float | None = None,
        estimated_tokens: int = 0,
    ) -> Sent[Embeddings]:
        """POST ``/embeddings`` for ``inputs``; vectors come back in input order."""
        body = {"model": model, "input": list(inputs)}
        sent = await self._post("/embeddings", body, model, deadline_seconds, estimated_tokens, bytes)
        try:
            data = orjson.loads(sent.result)
            rows = sorted(data["data"], key=lambda row: row["index"])
            vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ModelUnavailable(
                f"the embeddings endpoint of {self.where} answered with an unusable body: "
                f"{sent.result[:200]!r}"
            ) from None
        if vectors.shape[0] != len(inputs):
            raise ModelUnavailable(
                f"the embeddings endpoint of {self.where} returned {vectors.shape[0]} vectors for "
                f"{len(inputs)} inputs"
            )
        usage = data.get("usage") or {}
        tokens = int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
        return Sent(
            Embeddings(vectors, str(data.get("model") or model), tokens), sent.http_attempts, sent.seconds
        )

    async def _post(
        self,
        path: str,
        body: dict[str, Any],
        model: str,
        deadline_seconds: float | None,
        estimated_tokens: int,
        parse: Callable[[bytes], ResultT],
    ) -> Sent[ResultT]:
        """POST ``body`` to ``path`` under the retry policy; ``parse`` turns the reply body into the result
        (a :class:`MalformedResponse` from it is retried like a 5xx)."""
        settings = self.settings
        deadline = deadline_seconds if deadline_seconds is not None else settings.deadline_seconds
        started = time.monotonic()
        attempts = 0
        try:
            async for attempt in request_retrying(settings.max_retries, deadline_seconds=deadline):
                with attempt:
                    attempts += 1
                    if attempts > 1:
                        self.http_retries += 1
                    await self._acquire(estimated_tokens)
                    timeout = settings.timeout
                    if deadline is not None:
                        timeout = min(timeout, max(0.001, deadline - (time.monotonic() - started)))
                    result = parse(await self._send(path, body, timeout))
        except MalformedResponse as error:
            failure: ModelCallError = ModelUnavailable(
                f"{self.where} kept answering with malformed bodies for model '{model}' after {attempts} "
                f"attempt(s): {error}"
            )
            failure.http_attempts = attempts
            raise failure from error
        except openai.APIError as error:
            failure = self._explain(error, model, attempts)
            failure.http_attempts = attempts
            raise failure from error
        return Sent(result, attempts, time.monotonic() - started)

    async def _send(self, path: str, body: dict[str, Any], timeout: float) -> bytes:
        """One HTTP attempt; a failure is raised as the SDK's typed error for it."""
        base_url, headers = self._target()
        url = base_url + path
        try:
            session = self._http()
            proxy, proxy_auth = self._proxy
            async with session.post(
                url,
                data=orjson.dumps(body),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                proxy=proxy,
                proxy_auth=proxy_auth,
            ) as response:
                content = await response.read()
                status, reply_headers = response.status, dict(response.headers)
        except TimeoutError:
            raise openai.APITimeoutError(request=self._http_request(url)) from None
        except aiohttp.ClientError as error:
            raise openai.APIConnectionError(
                message=f"Connection error: {error}", request=self._http_request(url)
            ) from error
        if status >= 400:
            request = self._http_request(url)
            failed = http_library().Response(status, headers=reply_headers, content=content, request=request)
            raise self._sdk()._make_status_error_from_response(failed)
        return content

    @staticmethod
    def _http_request(url: str) -> Any:
        return http_library().Request("POST", url)

    def _explain(self, error: openai.APIError, model: str, attempts: int) -> ModelCallError:
        where = self.where
        if isinstance(error, openai.NotFoundError):
            return ModelNotServed(
                f"the endpoint of {where} answered 404 for model '{model}': check the 'model' parameter "
                f"or the connection's default_model, and the base URL. Server said: {error.message}"
            )
        if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
            return EndpointRejected(
                f"the endpoint of {where} refused the API key (HTTP {error.status_code}): set a valid key in "
                f"the connection's password field. Server said: {error.message}"
            )
        if isinstance(error, openai.BadRequestError | openai.UnprocessableEntityError):
            return EndpointRejected(
                f"the endpoint of {where} rejected the request for model '{model}' (HTTP "
                f"{error.status_code}): {error.message}. If it rejects response_format json_schema, set "
                "the connection's structured_output extra to 'json_object'."
            )
        kind = "transient" if is_transient(error) else "unexpected"
        return ModelUnavailable(
            f"call to {where} for model '{model}' failed after {attempts} attempt(s) ({kind} "
            f"{type(error).__name__}): {error}"
        )

    # -- discovery ----------------------------------------------------------------------------------------

    async def list_models(self) -> list[str]:
        """Model ids the endpoint serves; free (no tokens), so it doubles as the connection test."""
        page = await self._sdk().models.list()
        return [model.id for model in page.data]

    async def served_models(self) -> list[str] | None:
        """The listed models (asked once per transport), or None when the endpoint cannot list them."""
        if not self._served_checked:
            self._served_checked = True
            try:
                self._served = await self.list_models()
            except (TimeoutError, openai.APIError):
                self._served = None
        return self._served

    async def ensure_served(self, model: str) -> None:
        """Fail before anything is spent when the endpoint lists models and ``model`` is not one of them.

        Some servers (llama.cpp) silently answer with whatever model they have loaded; checking the list
        keeps a typo from turning into results from the wrong model.
        """
        served = await self.served_models()
        if served and model not in served:
            raise ModelNotServed(
                f"model '{model}' is not served by {self.where}. Set the operator's 'model' parameter (or "
                f"the connection's default_model, or the policy route) to one of: "
                f"{', '.join(sorted(served)[:30])}."
            )
