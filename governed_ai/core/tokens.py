"""Counting a request's prompt tokens before it is sent: for the input-size guard and budget reservations.

With the model's own tokenizer (configured on the LLM connection as ``tokenizer``) the count is exact for
the message contents; without one, a deliberately pessimistic estimate is used, so a reservation is rarely
smaller than what the call really uses. Either way a few tokens per message are added for the chat
template's role markers.

Tokenizers: ``gguf:<path>`` reads the vocabulary of a GGUF model file with llama-cpp-python (the local
model's own tokenizer; needs the ``local-model`` extra). Anything else is a configuration error.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Protocol

from governed_ai.core.errors import ConfigurationError, InvalidInput
from governed_ai.core.pricing import estimate_prompt_tokens

# Role markers and separators a chat template adds around each message (e.g. "<|im_start|>user\n").
TEMPLATE_TOKENS_PER_MESSAGE = 6


class InputTooLarge(InvalidInput):
    """A request's prompt is over the policy's per-call input limit: it fails alone, before anything is
    reserved or sent (in a batch, the other items go on)."""


class TokenCounter(Protocol):
    """Counts the tokens of a text as a model's tokenizer would."""

    exact: bool

    def count(self, text: str) -> int: ...


class EstimatingCounter:
    """No tokenizer available: about 2.5 characters per token, an upper bound for most text."""

    exact = False

    def count(self, text: str) -> int:
        return estimate_prompt_tokens(len(text))


class GgufTokenizer:
    """The tokenizer inside a GGUF model file, loaded (vocabulary only, no weights) once per process."""

    exact = True

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._model: Any = None

    def _vocab(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    from llama_cpp import Llama
                except ImportError:
                    raise ConfigurationError(
                        "the connection's tokenizer 'gguf:...' needs llama-cpp-python: install "
                        "airflow-provider-governed-ai[local-model], or remove the tokenizer extra to count "
                        "tokens by estimate"
                    ) from None
                self._model = Llama(model_path=self.path, vocab_only=True, verbose=False)
            return self._model

    def count(self, text: str) -> int:
        if not text:
            return 0
        return len(self._vocab().tokenize(text.encode("utf-8"), add_bos=False, special=False))


@lru_cache(maxsize=16)
def token_counter(spec: str | None) -> TokenCounter:
    """The counter a connection's ``tokenizer`` setting names (None: the estimate)."""
    if not spec:
        return EstimatingCounter()
    kind, _, where = spec.partition(":")
    if kind == "gguf" and where:
        return GgufTokenizer(where)
    raise ConfigurationError(
        f"unknown tokenizer {spec!r} on the LLM connection; use 'gguf:<path to a .gguf model file>', or "
        "leave it empty to count tokens by estimate"
    )


def count_messages(counter: TokenCounter, messages: Sequence[dict[str, Any]]) -> int:
    """Prompt tokens of a chat request's messages, template markers included."""
    total = 3  # the assistant turn the template opens for the reply
    for message in messages:
        content = message.get("content")
        text = content if isinstance(content, str) else "" if content is None else str(content)
        total += counter.count(text) + TEMPLATE_TOKENS_PER_MESSAGE
    return total
