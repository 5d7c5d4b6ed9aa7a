"""Redaction of secrets, personal data and policy-defined patterns.

``Redactor(settings, known_secrets).redact(text)`` returns the text with every finding replaced by
``[REDACTED:<KIND>]`` plus the findings (kind, offsets, detector; never the value). ``redact_obj`` does the
same for every string in a JSON-like structure (XCom values, audit content).
"""

from __future__ import annotations

from governed_ai.core.redaction.redactor import Redactor, marker, report_secrets
from governed_ai.core.redaction.results import (
    ObjectRedactionFinding,
    ObjectRedactionResult,
    RedactionFinding,
    RedactionResult,
)
from governed_ai.core.redaction.settings import RedactionSettings

__all__ = [
    "ObjectRedactionFinding",
    "ObjectRedactionResult",
    "RedactionFinding",
    "RedactionResult",
    "RedactionSettings",
    "Redactor",
    "marker",
    "report_secrets",
]
