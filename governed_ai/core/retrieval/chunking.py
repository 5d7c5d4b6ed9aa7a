"""Splitting documents into overlapping chunks of bounded size, at natural boundaries when possible."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Preferred cut points, best first: a blank line (paragraph or Markdown block), a line end, a sentence end,
# then any whitespace. A chunk is cut at the last such point inside its window when one exists.
_BOUNDARIES = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"(?<=[.!?])\s+"), re.compile(r"\s+"))


class ChunkingSettings(BaseModel):
    """How documents are split: sizes are in characters (models see ~4 characters per token)."""

    model_config = ConfigDict(frozen=True)

    chunk_size: int = Field(default=800, ge=50, le=20_000, description="maximum characters per chunk")
    chunk_overlap: int = Field(default=100, ge=0, description="characters repeated from the previous chunk")

    @model_validator(mode="after")
    def _overlap_smaller_than_size(self) -> ChunkingSettings:
        if self.chunk_overlap >= self.chunk_size // 2:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be less than half of chunk_size "
                f"({self.chunk_size}); otherwise chunks mostly repeat each other"
            )
        return self


@dataclass(frozen=True)
class TextSpan:
    """One chunk's text and where it sits in the document (character offsets)."""

    text: str
    start: int
    end: int


def _cut_point(text: str, start: int, hard_end: int, min_end: int) -> int:
    window = text[min_end:hard_end]
    for boundary in _BOUNDARIES:
        last = None
        for match in boundary.finditer(window):
            last = match
        if last is not None:
            return min_end + last.end()
    return hard_end


def _overlap_start(text: str, earliest: int, end: int) -> int:
    # Start the overlap on a word: the first whitespace after ``earliest``; none means no overlap.
    if earliest <= 0 or text[earliest - 1].isspace():
        return max(earliest, 0)
    match = re.compile(r"\s+").search(text, earliest, end)
    return match.end() if match else end


def chunk_text(text: str, settings: ChunkingSettings | None = None) -> list[TextSpan]:
    """Chunks of at most ``chunk_size`` characters covering ``text``, each starting ``chunk_overlap``
    characters before the previous one ended; whitespace-only chunks are dropped."""
    s = settings or ChunkingSettings()
    spans: list[TextSpan] = []
    start = 0
    length = len(text)
    while start < length:
        hard_end = min(start + s.chunk_size, length)
        # Never cut in the first half of a window: that would make many tiny chunks.
        end = hard_end if hard_end == length else _cut_point(text, start, hard_end, start + s.chunk_size // 2)
        piece = text[start:end]
        if piece.strip():
            left = len(piece) - len(piece.lstrip())
            right = len(piece.rstrip())
            spans.append(TextSpan(piece[left:right], start + left, start + right))
        if end >= length:
            break
        start = max(_overlap_start(text, end - s.chunk_overlap, end), start + 1)
    return spans
