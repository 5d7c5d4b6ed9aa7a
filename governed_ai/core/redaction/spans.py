"""Building blocks the detectors share: the span a detector reports and a lazily-probed view of the text."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

# Label precedence when two overlapping spans are equally long: secrets name the bigger risk, so they win.
RANK_SECRET = 0
RANK_CUSTOM = 1
RANK_PII = 2

# Characters an API token, key or password-like value is made of. Used to measure "token runs" (the
# prefilter for the long-token secret plugins) and to widen a detector's hit to the whole token.
TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")

# Every plugin prefilter that asks for a run of token characters asks for at least this many, so a single
# search for this length rules them all out on ordinary prose.
MIN_GATED_TOKEN_RUN = 20
_LONG_TOKEN_RUN = re.compile(rf"[A-Za-z0-9_\-+/=]{{{MIN_GATED_TOKEN_RUN},}}")

_MARKER = re.compile(r"\[REDACTED:[A-Z0-9_]+\]")


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of the input a detector wants replaced; ``kind`` becomes ``[REDACTED:<kind>]``."""

    start: int
    end: int
    kind: str
    detector: str
    rank: int


class TextProbe:
    """The text under scan plus cheap facts about it, each computed at most once and only if asked for.

    Detectors use these facts as prefilters so that the common case (ordinary prose, no findings) never
    reaches the expensive matchers.
    """

    __slots__ = ("_covered", "_long_runs", "_lower", "_uncovered", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._lower: str | None = None
        self._long_runs: tuple[int, ...] | None = None
        self._covered: list[tuple[int, int]] = []
        self._uncovered: str | None = None

    def cover(self, spans: Iterable[Span]) -> None:
        """Record spans already found, for detectors that only need to look at the rest."""
        before = len(self._covered)
        self._covered.extend((span.start, span.end) for span in spans)
        if len(self._covered) != before:
            self._uncovered = None

    @property
    def uncovered_text(self) -> str:
        """The text with every covered span blanked to spaces (same length, so offsets still hold).

        A detector that looks only at this text loses nothing: whatever it found inside a covered span
        would be merged into that span anyway.
        """
        if self._uncovered is None:
            if not self._covered:
                self._uncovered = self.text
            else:
                chars = list(self.text)
                for start, end in self._covered:
                    chars[start:end] = " " * (end - start)
                self._uncovered = "".join(chars)
        return self._uncovered

    @property
    def lower(self) -> str:
        """The text lowercased, for case-insensitive literal prefilters."""
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    def has_token_run(self, length: int) -> bool:
        """Whether the text holds an unbroken run of at least ``length`` token characters.

        ``length`` must be 0 or at least ``MIN_GATED_TOKEN_RUN``; shorter runs are not tracked.
        """
        if length <= 0:
            return True
        if self._long_runs is None:
            # Whitespace-separated words bound the runs from above; str.split is far cheaper than running
            # the run regex over the whole text, and ordinary prose has no word this long at all.
            self._long_runs = tuple(
                len(run)
                for word in self.text.split()
                if len(word) >= MIN_GATED_TOKEN_RUN
                for run in _LONG_TOKEN_RUN.findall(word)
            )
        return any(run >= length for run in self._long_runs)

    def contains_any(self, literals: Iterable[str]) -> bool:
        """Whether any of the case-sensitive ``literals`` occurs in the text."""
        text = self.text
        return any(literal in text for literal in literals)

    def contains_any_lower(self, literals: Iterable[str]) -> bool:
        """Whether any of the lowercase ``literals`` occurs in the text, ignoring case."""
        lower = self.lower
        return any(literal in lower for literal in literals)


class Detector(Protocol):
    """One source of findings; reports spans over ``probe.text`` (overlaps are resolved by the caller)."""

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield the spans to redact in ``probe.text``."""
        ...


def widen_right(text: str, end: int) -> int:
    """Extend ``end`` over following token characters (for detectors that report only a token's prefix)."""
    length = len(text)
    while end < length and text[end] in TOKEN_CHARS:
        end += 1
    return end


def marker_spans(text: str) -> list[tuple[int, int]]:
    """Where ``text`` already holds ``[REDACTED:...]`` markers, so redacting twice changes nothing."""
    if "[REDACTED:" not in text:
        return []
    return [m.span() for m in _MARKER.finditer(text)]


def merge_overlapping(spans: Iterable[Span]) -> list[Span]:
    """Resolve overlaps: each group of overlapping spans becomes one span covering all of them.

    The merged span is labelled by its longest member (ties go to the lower rank, then the earlier span).
    Covering the union rather than dropping the shorter spans means a partial overlap never leaves part of
    a secret in the clear. Result is sorted by start; touching spans stay separate.
    """
    ordered = sorted(spans, key=lambda s: (s.start, -s.end, s.rank))
    merged: list[tuple[int, int, Span]] = []
    for span in ordered:
        if merged and span.start < merged[-1][1]:
            start, end, label = merged[-1]
            if (span.end - span.start, -span.rank) > (label.end - label.start, -label.rank):
                label = span
            merged[-1] = (start, max(end, span.end), label)
        else:
            merged.append((span.start, span.end, span))
    return [Span(start, end, label.kind, label.detector, label.rank) for start, end, label in merged]
