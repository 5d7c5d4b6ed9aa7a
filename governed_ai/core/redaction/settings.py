"""Which detectors the redactor runs."""

from __future__ import annotations

import re
from collections.abc import Sequence

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, field_validator

from governed_ai.core.redaction.custom import kind_for_pattern_name
from governed_ai.core.redaction.secret_plugins import available_plugin_names


class RedactionSettings(BaseModel):
    """Detector families to run; everything is on by default except high-entropy strings and IP addresses.

    Known secret values are not switched here: they are always masked when given to the ``Redactor``.
    ``custom_patterns`` take ``(name, regex)`` pairs, the regex as a string or compiled; matches become
    ``[REDACTED:<NAME>]``. Use inline flags (``(?i)``) rather than compile flags if the settings are
    serialised, since only the pattern text survives a JSON round trip.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    secrets: bool = True
    """detect-secrets plugins (AWS, GitHub, Slack, Stripe, JWT, private keys, keyword assignments, ...)
    plus passwords in URLs, authorization headers, bearer tokens and OpenAI-style keys."""
    high_entropy_secrets: bool = False
    """detect-secrets' base64/hex high-entropy plugins; noisy on ordinary text, hence off."""
    random_tokens: bool = True
    """Keyword-less random tokens such as an AWS secret access key in a sentence (see
    :mod:`governed_ai.core.redaction.random_tokens`); tuned not to flag hashes, ids and identifiers."""
    disabled_secret_plugins: frozenset[str] = frozenset()
    """detect-secrets plugin class names to skip, e.g. ``{"ArtifactoryDetector"}``."""
    emails: bool = True
    phone_numbers: bool = True
    default_phone_region: str | None = "US"
    """Region for numbers written without ``+``; ``None`` finds only international (``+``) numbers."""
    payment_cards: bool = True
    ibans: bool = True
    ip_addresses: bool = False
    custom: bool = True
    """Whether ``custom_patterns`` are applied."""
    custom_patterns: Sequence[tuple[str, str | re.Pattern[str]]] = ()
    """``(name, regex)`` pairs; stored as a tuple of ``(name, compiled regex)``."""
    min_known_secret_length: int = Field(default=5, ge=1)
    """Known secret values shorter than this are ignored."""

    @field_validator("default_phone_region")
    @classmethod
    def _known_region(cls, region: str | None) -> str | None:
        if region is None:
            return None
        region = region.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {region!r}; expected an ISO 3166 code such as 'US'")
        return region

    @field_validator("disabled_secret_plugins")
    @classmethod
    def _known_plugins(cls, names: frozenset[str]) -> frozenset[str]:
        unknown = names - available_plugin_names()
        if unknown:
            raise ValueError(
                f"unknown detect-secrets plugins {sorted(unknown)}; known: {sorted(available_plugin_names())}"
            )
        return names

    @field_validator("custom_patterns")
    @classmethod
    def _compiled_patterns(
        cls, patterns: Sequence[tuple[str, str | re.Pattern[str]]]
    ) -> tuple[tuple[str, re.Pattern[str]], ...]:
        compiled: list[tuple[str, re.Pattern[str]]] = []
        for name, regex in patterns:
            kind_for_pattern_name(name)
            try:
                compiled.append((name, re.compile(regex)))
            except re.error as error:
                raise ValueError(f"custom pattern {name!r} is not a valid regex: {error}") from None
        # A tuple keeps the settings hashable, which lets redactors with equal settings share detectors.
        return tuple(compiled)

    def compiled_custom_patterns(self) -> tuple[tuple[str, re.Pattern[str]], ...]:
        """``custom_patterns`` with their regexes compiled (the validator already stored them so)."""
        return tuple((name, re.compile(regex)) for name, regex in self.custom_patterns)
