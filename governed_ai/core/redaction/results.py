"""What a redaction reports: the redacted content and where something was replaced, never what."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict


class RedactionFinding(BaseModel):
    """One replaced span: offsets into the *original* text, the kind it was replaced as, and by whom."""

    model_config = ConfigDict(frozen=True)

    kind: str
    start: int
    end: int
    detector: str


class RedactionResult(BaseModel):
    """The redacted text and its findings, in text order."""

    model_config = ConfigDict(frozen=True)

    text: str
    findings: tuple[RedactionFinding, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether anything was redacted."""
        return bool(self.findings)

    def counts_by_kind(self) -> dict[str, int]:
        """How many spans of each kind were replaced (what an audit record should carry)."""
        return dict(Counter(f.kind for f in self.findings))


PathElement = str | int


class ObjectRedactionFinding(RedactionFinding):
    """A finding inside a JSON-like structure: where the string sits, and whether it was a dict key.

    ``path`` uses the already-redacted keys, so it never carries the data it points at.
    """

    path: tuple[PathElement, ...]
    in_key: bool = False


class ObjectRedactionResult(BaseModel):
    """A redacted copy of a JSON-like value and the findings in all of its strings."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    value: Any
    findings: tuple[ObjectRedactionFinding, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether anything was redacted."""
        return bool(self.findings)

    def counts_by_kind(self) -> dict[str, int]:
        """How many spans of each kind were replaced."""
        return dict(Counter(f.kind for f in self.findings))
