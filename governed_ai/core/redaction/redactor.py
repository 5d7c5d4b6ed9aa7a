"""The redactor: runs the enabled detectors over a text and replaces what they find with markers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, TypeVar, cast

from governed_ai.core.redaction.credential_patterns import CREDENTIAL_PATTERNS, PemPrivateKeyDetector
from governed_ai.core.redaction.custom import CustomPatternDetector
from governed_ai.core.redaction.known import KnownSecretsDetector
from governed_ai.core.redaction.pii import (
    EmailDetector,
    IbanDetector,
    Ipv4Detector,
    PaymentCardDetector,
    PhoneDetector,
)
from governed_ai.core.redaction.random_tokens import RandomTokenDetector
from governed_ai.core.redaction.results import (
    ObjectRedactionFinding,
    ObjectRedactionResult,
    PathElement,
    RedactionFinding,
    RedactionResult,
)
from governed_ai.core.redaction.secret_plugins import SECRET_KIND, secret_plugin_detectors
from governed_ai.core.redaction.settings import RedactionSettings
from governed_ai.core.redaction.spans import Detector, Span, TextProbe, marker_spans, merge_overlapping

T = TypeVar("T")


def marker(kind: str) -> str:
    """The text a span of ``kind`` is replaced with."""
    return f"[REDACTED:{kind}]"


@lru_cache(maxsize=64)
def _detectors_for(settings: RedactionSettings) -> tuple[Detector, ...]:
    # Settings are frozen and hashable; per-task redactors with equal settings share compiled detectors.
    detectors: list[Detector] = []
    if settings.secrets:
        detectors.extend(
            secret_plugin_detectors(settings.disabled_secret_plugins, settings.high_entropy_secrets)
        )
        detectors.extend(CREDENTIAL_PATTERNS)
        detectors.append(PemPrivateKeyDetector())
        if settings.random_tokens:
            detectors.append(RandomTokenDetector())
    if settings.custom:
        detectors.extend(
            CustomPatternDetector(name, regex) for name, regex in settings.compiled_custom_patterns()
        )
    if settings.emails:
        detectors.append(EmailDetector())
    if settings.payment_cards:
        detectors.append(PaymentCardDetector())
    if settings.ibans:
        detectors.append(IbanDetector())
    if settings.ip_addresses:
        detectors.append(Ipv4Detector())
    if settings.phone_numbers:
        # Last: it skips whatever the others found (see PhoneDetector).
        detectors.append(PhoneDetector(settings.default_phone_region))
    return tuple(detectors)


_SHORT_TEXT = 64
_SHORT_CACHE_ENTRIES = 4096


class Redactor:
    """Masks secrets, personal data and policy-defined patterns in text and JSON-like values.

    Matches become ``[REDACTED:<KIND>]`` (``SECRET``, ``EMAIL``, ``PHONE``, ``PAYMENT_CARD``, ``IBAN``,
    ``IP_ADDRESS`` or a custom pattern's name). Overlapping findings are merged into one replacement labelled
    by the longest. Text that already holds markers is left as is, so redacting twice changes nothing.

    Immutable after construction and safe to share between threads. ``known_secrets`` are exact values to
    mask wherever they occur (the values Airflow's secrets masker knows); they are never shown in
    ``repr`` or findings.
    """

    __slots__ = ("_detectors", "_known", "_settings", "_short")

    def __init__(self, settings: RedactionSettings | None = None, known_secrets: Iterable[str] = ()) -> None:
        self._settings = settings if settings is not None else RedactionSettings()
        self._known = KnownSecretsDetector(known_secrets, self._settings.min_known_secret_length)
        self._detectors = _detectors_for(self._settings)
        # Short strings repeat (JSON keys, model names, labels a model answers with): their results are
        # kept, since the redactor never changes. Bounded; a full cache is simply cleared.
        self._short: dict[str, RedactionResult] = {}

    @property
    def settings(self) -> RedactionSettings:
        """The settings this redactor was built with."""
        return self._settings

    def with_known_secrets(self, known_secrets: Iterable[str]) -> Redactor:
        """A redactor with the same settings that masks ``known_secrets`` (instead of this one's)."""
        return Redactor(self._settings, known_secrets)

    def __repr__(self) -> str:
        return f"Redactor(detectors={len(self._detectors)}, known_secrets={len(self._known)})"

    def redact(self, text: str) -> RedactionResult:
        """Redact ``text``; findings carry offsets into ``text``, the kind and the detector, never values."""
        if not isinstance(text, str):
            raise TypeError(f"redact() takes a str, not {type(text).__name__}; use redact_obj() for values")
        if len(text) <= _SHORT_TEXT:
            cached = self._short.get(text)
            if cached is None:
                if len(self._short) >= _SHORT_CACHE_ENTRIES:
                    self._short.clear()
                cached = self._short[text] = self._redact(text)
            return cached
        return self._redact(text)

    def _redact(self, text: str) -> RedactionResult:
        spans = self._spans(text) if text else []
        if not spans:
            return RedactionResult(text=text)
        pieces: list[str] = []
        position = 0
        for span in spans:
            pieces.append(text[position : span.start])
            pieces.append(marker(span.kind))
            position = span.end
        pieces.append(text[position:])
        findings = tuple(
            RedactionFinding(kind=s.kind, start=s.start, end=s.end, detector=s.detector) for s in spans
        )
        return RedactionResult(text="".join(pieces), findings=findings)

    def redact_obj(self, obj: T) -> T:
        """A copy of a JSON-like value (dicts, lists, tuples, strings, numbers...) with all strings redacted.

        String dict keys are redacted too; keys that collide after redaction get ``#2``, ``#3``, ...
        appended so no entry is lost. Anything that is not a str/dict/list/tuple is returned unchanged.
        """
        return cast(T, self._walk(obj, (), None))

    def redact_obj_detailed(
        self, obj: object, *, on_secret: Callable[[str], None] | None = None
    ) -> ObjectRedactionResult:
        """Like ``redact_obj``, also reporting each finding with the path of the string it was in.

        ``on_secret`` is called with the original text of every ``SECRET`` finding (e.g. to register it with
        a log masker); findings themselves never carry values.
        """
        findings: list[ObjectRedactionFinding] = []
        value = self._walk(obj, (), findings, on_secret)
        return ObjectRedactionResult(value=value, findings=tuple(findings))

    def _spans(self, text: str) -> list[Span]:
        probe = TextProbe(text)
        spans = [span for span in self._known.find(probe) if span.end > span.start]
        probe.cover(spans)
        for detector in self._detectors:
            found = [span for span in detector.find(probe) if span.end > span.start]
            if found:
                probe.cover(found)
                spans.extend(found)
        if not spans:
            return spans
        markers = marker_spans(text)
        if markers:
            spans = [s for s in spans if not any(lo <= s.start and s.end <= hi for lo, hi in markers)]
        return merge_overlapping(spans)

    def _walk(
        self,
        value: object,
        path: tuple[PathElement, ...],
        findings: list[ObjectRedactionFinding] | None,
        on_secret: Callable[[str], None] | None = None,
    ) -> Any:
        if isinstance(value, str):
            result = self.redact(value)
            if findings is not None:
                findings.extend(_located(result, path, in_key=False))
            if on_secret is not None:
                report_secrets(value, result, on_secret)
            return result.text
        if isinstance(value, dict):
            key_results = {key: self.redact(key) for key in value if isinstance(key, str)}
            if on_secret is not None:
                for key, reported in key_results.items():
                    report_secrets(key, reported, on_secret)
            # Keys that stay as they are keep their names; redacted ones step around them and each other.
            taken = {key for key in value if key not in key_results or not key_results[key].changed}
            redacted: dict[Any, Any] = {}
            for key, item in value.items():
                new_key = key
                key_result = key_results.get(key)
                if key_result is not None and key_result.changed:
                    new_key = _unique_key(key_result.text, taken)
                    taken.add(new_key)
                    if findings is not None:
                        findings.extend(_located(key_result, (*path, new_key), in_key=True))
                redacted[new_key] = self._walk(item, (*path, new_key), findings, on_secret)
            return redacted
        if isinstance(value, list | tuple):
            items = [
                self._walk(item, (*path, index), findings, on_secret) for index, item in enumerate(value)
            ]
            return items if isinstance(value, list) else tuple(items)
        return value


def report_secrets(text: str, result: RedactionResult, on_secret: Callable[[str], None]) -> None:
    """Call ``on_secret`` with the original value of each ``SECRET`` finding of ``result`` (from ``text``)."""
    for finding in result.findings:
        if finding.kind == SECRET_KIND:
            on_secret(text[finding.start : finding.end])


def _unique_key(key: str, taken: set[Any]) -> str:
    if key not in taken:
        return key
    suffix = 2
    while f"{key}#{suffix}" in taken:
        suffix += 1
    return f"{key}#{suffix}"


def _located(
    result: RedactionResult, path: tuple[PathElement, ...], *, in_key: bool
) -> list[ObjectRedactionFinding]:
    return [
        ObjectRedactionFinding(
            kind=f.kind, start=f.start, end=f.end, detector=f.detector, path=path, in_key=in_key
        )
        for f in result.findings
    ]
