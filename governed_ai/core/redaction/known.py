"""Secret values already known to the caller (e.g. everything Airflow's secrets masker has registered)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from governed_ai.core.redaction.secret_plugins import SECRET_KIND
from governed_ai.core.redaction.spans import RANK_SECRET, Span, TextProbe


class KnownSecretsDetector:
    """Every occurrence of any known secret value, matched exactly (case-sensitive).

    Values shorter than ``min_length`` (after stripping whitespace) are ignored: masking every "abc" or
    "1234" would shred ordinary text while protecting nothing that deserves the name secret.
    """

    name = "known-secret"

    def __init__(self, values: Iterable[str], min_length: int) -> None:
        usable = {v for v in values if isinstance(v, str) and len(v.strip()) >= min_length}
        # Longest first, so a value that contains another is reported as the whole.
        self._values: tuple[str, ...] = tuple(sorted(usable, key=len, reverse=True))

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        # Never the values themselves.
        return f"KnownSecretsDetector(<{len(self._values)} values>)"

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield a span per occurrence of each known value."""
        text = probe.text
        for value in self._values:
            position = text.find(value)
            while position >= 0:
                yield Span(position, position + len(value), SECRET_KIND, self.name, RANK_SECRET)
                position = text.find(value, position + 1)
