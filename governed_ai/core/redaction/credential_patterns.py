"""Credential shapes detect-secrets 1.5 does not cover, or covers only in code-file form.

- passwords in URLs, including an empty user (``redis://:pw@host``) and passwords holding ``@``;
- ``Authorization: Basic|Bearer|Token ...`` headers and free-standing ``Bearer <token>``;
- OpenAI-style ``sk-...`` keys in their current formats (the plugin knows only the legacy one);
- tokens and API keys assigned to a name (``access_token=...``, ``API key: ...``);
- PEM private keys of any type, including ``ENCRYPTED PRIVATE KEY`` blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from governed_ai.core.redaction.secret_plugins import SECRET_KIND, is_real_value, pem_block_end
from governed_ai.core.redaction.spans import RANK_SECRET, Span, TextProbe

_TOKEN_VALUE = r"[A-Za-z0-9._~+/\-]+=*"


def _has_digit(value: str) -> bool:
    return any(ch.isdigit() for ch in value)


def _has_letter_and_digit(value: str) -> bool:
    return _has_digit(value) and any(ch.isalpha() for ch in value)


def _any_value(value: str) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class CredentialPattern:
    """A regex whose ``value`` group is the credential, plus the checks a value must pass to count."""

    name: str
    regex: re.Pattern[str]
    lower_hints: tuple[str, ...]
    min_length: int
    accept: Callable[[str], bool]

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield the credential value of every match, if the text mentions one of the hints at all."""
        if not probe.contains_any_lower(self.lower_hints):
            return
        text = probe.text
        for match in self.regex.finditer(text):
            start, end = match.span("value")
            # A sentence may end right after a token: the full stop is not part of it.
            while end > start and text[end - 1] == ".":
                end -= 1
            value = text[start:end]
            if len(value) >= self.min_length and is_real_value(value) and self.accept(value):
                yield Span(start, end, SECRET_KIND, self.name, RANK_SECRET)


class PemPrivateKeyDetector:
    """Whole PEM private-key blocks, header to END line (or to the end of a truncated text)."""

    name = "pem-private-key"
    _header = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield one span per private-key block."""
        if "PRIVATE KEY" not in probe.text:
            return
        text = probe.text
        for match in self._header.finditer(text):
            yield Span(match.start(), pem_block_end(text, match.end()), SECRET_KIND, self.name, RANK_SECRET)


CREDENTIAL_PATTERNS: tuple[CredentialPattern, ...] = (
    CredentialPattern(
        name="url-password",
        # userinfo ``user:password@``; the password runs to the last "@" before the path, so "p@ss" works.
        regex=re.compile(
            r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@\[\]]*:(?P<value>[^\s/?#]+)@"
        ),
        lower_hints=("://",),
        min_length=1,
        accept=_any_value,
    ),
    CredentialPattern(
        name="authorization-header",
        regex=re.compile(
            r"\b(?i:authorization)[\"']?\s*[:=]\s*[\"']?(?i:basic|bearer|token)\s+"
            r"(?P<value>" + _TOKEN_VALUE + ")"
        ),
        lower_hints=("authorization",),
        min_length=8,
        accept=_any_value,
    ),
    CredentialPattern(
        name="bearer-token",
        # Free-standing "Bearer x" is also ordinary English ("a bearer bond"): demand a token-like value.
        regex=re.compile(r"\b(?i:bearer)\s+(?P<value>" + _TOKEN_VALUE + ")"),
        lower_hints=("bearer",),
        min_length=16,
        accept=_has_digit,
    ),
    CredentialPattern(
        name="openai-style-key",
        regex=re.compile(r"(?<![A-Za-z0-9_\-])(?P<value>sk-[A-Za-z0-9_\-]{20,})"),
        lower_hints=("sk-",),
        min_length=23,
        accept=_has_letter_and_digit,
    ),
    CredentialPattern(
        name="credential-assignment",
        regex=re.compile(
            # Whatever precedes the name (``GITHUB_``, ``x-``) does not matter for where the value is.
            r"(?i:token|api[ _\-]?key|access[ _\-]?key|secret[ _\-]?key|client[ _\-]?secret)"
            r"[\"']?\s*[:=]\s*[\"']?(?P<value>" + _TOKEN_VALUE + ")"
        ),
        lower_hints=("token", "key", "secret"),
        min_length=8,
        accept=_has_letter_and_digit,
    ),
)
