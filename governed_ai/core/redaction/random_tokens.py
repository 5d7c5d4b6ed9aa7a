"""Secrets written without any keyword: long random tokens in prose ("the matching secret is wJalr...").

detect-secrets finds credentials by their prefix (``AKIA``, ``ghp_``, ``sk-``) or by a keyword next to them
(``aws_secret_access_key = ...``); a bare AWS secret access key in a sentence has neither. Its base64
high-entropy plugin would find it, but on every long identifier, hash and path too, which is why it is off by
default. This detector runs on the same ground, with detect-secrets' own entropy measure and heuristics, and
only accepts tokens that look random in every way a credential does:

* 32 to 128 characters of the base64 (``A-Z a-z 0-9 + /``) or URL-safe base64 (``A-Z a-z 0-9 _ -``)
  alphabet, as one whitespace-delimited run (optional ``=`` padding);
* upper case, lower case and digits all present (a random 40-character base64 string lacks digits with
  probability 0.1 %);
* Shannon entropy (detect-secrets' measure) at least ``log2(length) - 1`` bits per character, capped at
  :data:`MAX_ENTROPY_FLOOR` (a random string of ``n`` characters has at most ``log2(n)``);
* characters change class (upper/lower/digit/symbol) at least :data:`MIN_CLASS_CHANGES` of the time:
  random base64 changes class at about 0.65, CamelCase identifiers and paths far less.

And never flags what the project itself writes, or other data that is random-looking but not secret:

* hexadecimal only (SHA-256 content hashes, chunk ids, 24/64-hex keys, git SHAs, UUIDs with or without
  dashes): not base64-mixed-case, so never a candidate;
* detect-secrets' sequential strings (``ABCDEF...``) and UUIDs;
* base64 that decodes to text (JSON, prose): the encoding of data, not a key;
* prompt version ids (``name@v1#abcdef012345``): their hash part is hex;
* parts of URLs and file paths (a run that starts right after ``.``, ``/``, ``%`` or ``\\``, as in
  ``youtube.com/vi/...``).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
import re
from collections.abc import Iterator

from detect_secrets.filters.heuristic import is_potential_uuid, is_sequential_string
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString

from governed_ai.core.redaction.secret_plugins import SECRET_KIND
from governed_ai.core.redaction.spans import RANK_SECRET, Span, TextProbe

MIN_TOKEN = 32
MAX_TOKEN = 128
#: Random 40-character base64 has 4.36 bits per character or more in 99.8 % of cases (median 4.8), the
#: floor there is 4.32; a 40-character CamelCase name has about 4.3, and changes class too rarely anyway.
MAX_ENTROPY_FLOOR = 4.5
#: Random base64 changes class at 0.41 or more in 99.8 % of cases (median 0.64).
MIN_CLASS_CHANGES = 0.4
#: Share of printable characters above which decoded base64 counts as text (data, not a key).
_TEXT_SHARE = 0.95

_TOKEN = re.compile(
    rf"(?<![A-Za-z0-9+/_\-.%\\])(?:[A-Za-z0-9+/]{{{MIN_TOKEN},{MAX_TOKEN}}}={{0,2}}|[A-Za-z0-9_\-]{{{MIN_TOKEN},{MAX_TOKEN}}})"
    r"(?![A-Za-z0-9+/_\-=])"
)
_HEX = frozenset("0123456789abcdefABCDEF-")
_entropy = Base64HighEntropyString().calculate_shannon_entropy


def _class(ch: str) -> int:
    if ch.isupper():
        return 0
    if ch.islower():
        return 1
    if ch.isdigit():
        return 2
    return 3


def class_change_rate(token: str) -> float:
    """How often consecutive characters differ in class (upper, lower, digit, symbol), from 0 to 1."""
    if len(token) < 2:
        return 0.0
    changes = sum(1 for a, b in itertools.pairwise(token) if _class(a) != _class(b))
    return changes / (len(token) - 1)


def entropy_floor(length: int) -> float:
    """The least entropy (bits per character) a random token of ``length`` characters must have."""
    return min(MAX_ENTROPY_FLOOR, math.log2(length) - 1.0)


def _decodes_to_text(token: str) -> bool:
    padded = token + "=" * (-len(token) % 4)
    try:
        raw = base64.b64decode(
            padded, altchars=b"-_" if ("-" in token or "_" in token) else None, validate=True
        )
    except (binascii.Error, ValueError):
        return False
    if not raw:
        return False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(1 for ch in text if ch.isprintable() or ch in "\n\r\t")
    return printable / len(text) >= _TEXT_SHARE


def looks_random(token: str) -> bool:
    """Whether ``token`` (already of the right alphabet and length) looks like a random credential."""
    body = token.rstrip("=")
    if _HEX.issuperset(body):
        return False
    if not (
        any(c.isupper() for c in body) and any(c.islower() for c in body) and any(c.isdigit() for c in body)
    ):
        return False
    if class_change_rate(body) < MIN_CLASS_CHANGES or _entropy(body) < entropy_floor(len(body)):
        return False
    if is_sequential_string(body) or is_potential_uuid(body):
        return False
    return not _decodes_to_text(token)


class RandomTokenDetector:
    """Long random-looking tokens anywhere in the text (see the module docstring for the rules)."""

    name = "random-token"

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield each token that :func:`looks_random`."""
        if not probe.has_token_run(MIN_TOKEN):
            return
        text = probe.text
        for match in _TOKEN.finditer(text):
            if looks_random(match.group(0)):
                yield Span(match.start(), match.end(), SECRET_KIND, self.name, RANK_SECRET)


__all__ = [
    "MAX_ENTROPY_FLOOR",
    "MIN_CLASS_CHANGES",
    "RandomTokenDetector",
    "class_change_rate",
    "entropy_floor",
    "looks_random",
]
