"""Patterns a policy adds for one deployment (ticket IDs, employee numbers, internal hostnames, ...)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from governed_ai.core.redaction.spans import RANK_CUSTOM, Span, TextProbe

_NOT_KIND_CHARS = re.compile(r"[^A-Z0-9]+")


def kind_for_pattern_name(name: str) -> str:
    """The ``<KIND>`` a custom pattern's matches are replaced with: its name upper-cased, ``[A-Z0-9_]``."""
    kind = _NOT_KIND_CHARS.sub("_", name.upper()).strip("_")
    if not kind:
        raise ValueError(f"custom pattern name {name!r} has no letters or digits to name its kind")
    return kind


class CustomPatternDetector:
    """Every non-empty match of one policy-supplied regex (the whole match is replaced)."""

    def __init__(self, name: str, regex: re.Pattern[str]) -> None:
        self._kind = kind_for_pattern_name(name)
        self._name = f"custom:{name}"
        self._regex = regex

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield each non-empty match."""
        for match in self._regex.finditer(probe.text):
            if match.end() > match.start():
                yield Span(match.start(), match.end(), self._kind, self._name, RANK_CUSTOM)
