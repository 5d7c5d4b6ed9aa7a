"""Personal data: e-mail addresses, phone numbers, payment cards, IBANs and (optionally) IPv4 addresses.

Regexes only propose candidates; the well-kept libraries decide: ``phonenumbers`` (numbers valid for their
region), ``python-stdnum`` (Luhn) and ``schwifty`` (IBAN country length, structure and checksum).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

import phonenumbers
from schwifty import IBAN
from schwifty.registry import get_iban_spec
from stdnum import luhn

from governed_ai.core.redaction.spans import RANK_PII, Span, TextProbe

EMAIL_KIND = "EMAIL"
PHONE_KIND = "PHONE"
PAYMENT_CARD_KIND = "PAYMENT_CARD"
IBAN_KIND = "IBAN"
IP_ADDRESS_KIND = "IP_ADDRESS"

_LOCAL_PART_CHARS = r"A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-"
_EMAIL = re.compile(
    rf"(?<![{_LOCAL_PART_CHARS}@])[{_LOCAL_PART_CHARS}]+"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![A-Za-z0-9\-])"
)
# ``scheme://user:password@host`` is a credential (see credential_patterns), not an address.
_URL_USERINFO_BEFORE = re.compile(r"://[^\s/?#]*:\Z")

# Seven digits with at most three separators between neighbours: the least any valid number has (+690 and
# four digits). Below that the (comparatively slow) phone matcher is not run at all.
_PHONE_CANDIDATE = re.compile(r"\d(?:[^0-9A-Za-z]{0,3}\d){6}")

# 13-19 digits, single spaces or dashes allowed between them. Only the major networks' leading digits (2-6:
# Mastercard 2-series, Amex/Diners/JCB, Visa, Mastercard, Discover/UnionPay/Maestro) are considered, which
# keeps Luhn-valid-by-chance IDs such as epoch-millisecond timestamps (leading 1) out.
# (No lookbehind for the preceding digit: it would defeat the regex engine's first-character scan; checked
# in code instead.)
_CARD_CANDIDATE = re.compile(r"[2-6](?:[ \-]?[0-9]){12,18}(?![0-9])")

# Found via its check digits: digit pairs are rarer in prose than capital letters.
_IBAN_CHECK_DIGITS = re.compile(r"[0-9][0-9]")
# One regex per possible IBAN length (15-34), grouped in fours or not; the country fixes the length.
_IBAN_BY_LENGTH = {
    length: re.compile(rf"[A-Z]{{2}}[0-9]{{2}}(?: ?[A-Z0-9]){{{length - 4}}}(?![A-Za-z0-9])")
    for length in range(15, 35)
}

_IPV4_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?<![0-9.]){_IPV4_OCTET}(?:\.{_IPV4_OCTET}){{3}}(?!\.?[0-9])")


class EmailDetector:
    """E-mail addresses with a dotted domain and an alphabetic TLD (``user@localhost`` is not one)."""

    name = "email"

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield each e-mail address."""
        text = probe.text
        if "@" not in text:
            return
        for match in _EMAIL.finditer(text):
            start = match.start()
            if _URL_USERINFO_BEFORE.search(text, max(0, start - 256), start):
                continue
            yield Span(start, match.end(), EMAIL_KIND, self.name, RANK_PII)


class PhoneDetector:
    """Phone numbers ``phonenumbers`` finds valid: national ones for ``region``, ``+`` ones for any region.

    ``phonenumbers`` costs 0.1-0.5 ms per digit group it examines, so it looks only at the text outside what
    earlier detectors found (card numbers, IBANs and secrets are all digit groups it would try); run it last.
    """

    name = "phonenumbers"

    def __init__(self, region: str | None) -> None:
        self._region = region

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield each valid phone number."""
        if not _PHONE_CANDIDATE.search(probe.text):
            return
        searched = probe.uncovered_text
        if searched is not probe.text and not _PHONE_CANDIDATE.search(searched):
            return
        leniency = phonenumbers.Leniency.VALID
        for match in phonenumbers.PhoneNumberMatcher(searched, self._region, leniency=leniency):
            # Judged on the real text: a blanked neighbour must not make a code look like a lone number.
            if not _glued_to_identifier(probe.text, match.start, match.end):
                yield Span(match.start, match.end, PHONE_KIND, self.name, RANK_PII)


def _glued_to_identifier(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` is the tail or head of a longer code such as ``INV-2024-000123``.

    ``phonenumbers`` validates the digits alone, and many such codes happen to hold a valid number.
    """
    before = text[start - 2 : start] if start >= 2 else " " + text[:start]
    after = text[end : end + 2]
    glued_before = before[-1:].isalnum() or (before[-1:] in ("-", "_", "/") and before[:1].isalnum())
    glued_after = after[:1].isalnum() or (after[:1] in ("-", "_", "/") and after[1:2].isalnum())
    return glued_before or glued_after


class PaymentCardDetector:
    """Payment card numbers: 13-19 digits of a major network that pass the Luhn check."""

    name = "payment-card"

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield each Luhn-valid card number."""
        text = probe.text
        for match in _CARD_CANDIDATE.finditer(text):
            # A run of digits inside a word (a hex digest, an id) is not a card number.
            if match.start() > 0 and text[match.start() - 1].isalnum():
                continue
            if match.end() < len(text) and text[match.end()].isalnum():
                continue
            digits = match.group(0).replace(" ", "").replace("-", "")
            if 13 <= len(digits) <= 19 and luhn.is_valid(digits):
                yield Span(match.start(), match.end(), PAYMENT_CARD_KIND, self.name, RANK_PII)


class IbanDetector:
    """IBANs, compact or in groups of four, that ``schwifty`` accepts (length, structure, check digits)."""

    name = "iban"

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield each valid IBAN."""
        text = probe.text
        for digits in _IBAN_CHECK_DIGITS.finditer(text):
            start = digits.start() - 2
            country = text[start : digits.start()]
            if start < 0 or not ("A" <= country[0] <= "Z" and "A" <= country[1] <= "Z"):
                continue
            if start > 0 and text[start - 1].isalnum():
                continue
            candidate = _iban_regex_for(country)
            match = candidate.match(text, start) if candidate is not None else None
            if match is None:
                continue
            try:
                IBAN(match.group(0).replace(" ", ""))
            except ValueError:
                continue
            yield Span(match.start(), match.end(), IBAN_KIND, self.name, RANK_PII)


@lru_cache(maxsize=1024)
def _iban_regex_for(country: str) -> re.Pattern[str] | None:
    """The candidate regex for IBANs of ``country``, or None if it has no IBANs (cached: raising is slow)."""
    try:
        length = get_iban_spec(country).iban_length
    except ValueError:
        return None
    return _IBAN_BY_LENGTH.get(length)


class Ipv4Detector:
    """Dotted-quad IPv4 addresses (off by default: version numbers look the same)."""

    name = "ipv4"

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield each IPv4 address."""
        if "." not in probe.text:
            return
        for match in _IPV4.finditer(probe.text):
            yield Span(match.start(), match.end(), IP_ADDRESS_KIND, self.name, RANK_PII)
