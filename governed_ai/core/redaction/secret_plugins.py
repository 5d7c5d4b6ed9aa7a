"""Secrets found by Yelp's detect-secrets plugins, run on in-memory text and mapped back to character spans.

The plugins are used directly (their compiled ``denylist`` regexes and keyword tables) instead of through
``detect_secrets.core.scan.scan_line``: that path reads and mutates process-global settings (not safe when
several tasks redact at once) and yields only secret *values*, not where they are. Using the regexes
ourselves gives exact offsets, so only the secret is replaced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.filters.heuristic import is_indirect_reference, is_templated_secret
from detect_secrets.plugins import keyword as keyword_plugin
from detect_secrets.plugins.base import BasePlugin, RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin
from detect_secrets.plugins.ip_public import IPPublicDetector
from detect_secrets.plugins.keyword import KeywordDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector

from governed_ai.core.redaction.spans import (
    RANK_SECRET,
    Span,
    TextProbe,
    widen_right,
)

SECRET_KIND = "SECRET"

# Plugins that are never run as secret detectors: IP addresses are PII here (the optional ipv4 detector).
_NEVER_RUN = frozenset({IPPublicDetector.__name__})
_ENTROPY_PLUGINS = frozenset({"Base64HighEntropyString", "HexHighEntropyString"})

# Shortest value a high-entropy token must have; shorter random-looking words are mostly noise in prose.
_MIN_ENTROPY_TOKEN = 20

# Delimiters some plugin regexes include around the secret itself (Artifactory's ``(?:\s|=|:|"|^)`` before
# and ``(?:\s|"|$)`` after). "=" is only trimmed in front: at the end it may be base64 padding.
_LEADING_DELIMITERS = " \t\r\n\"'=:"
_TRAILING_DELIMITERS = " \t\r\n\"'"

_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")
_PUTTY_END = re.compile(r"Private-MAC: *[0-9A-Fa-f]+")

# Literals, one of which every keyword in detect-secrets' keyword denylist contains; lines without any of
# them cannot match the keyword regexes, so they are never scanned.
KEYWORD_HINTS = ("key", "pass", "pwd", "secret", "contrase")
# Every spelling of the denylist's keywords ("api_?key" is "api_key" or "apikey"), lowercase.
KEYWORD_SPELLINGS = tuple(
    sorted({entry.replace("_?", joiner) for entry in keyword_plugin.DENYLIST for joiner in ("_", "")})
)
# An unquoted keyword value ends at the first of these (the plugin's own regex runs to the end of line).
_UNQUOTED_VALUE_END = re.compile(r"[\s;,&)\]}]")
_QUOTES = "\"'`"
_ENV_REFERENCE = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class PluginGate:
    """A prefilter for one plugin: text that fails it cannot contain anything the plugin's regexes match.

    Passes when (no literals are given, or one of them occurs) and the text has a token run at least
    ``min_token_run`` long. Derived by reading each plugin's denylist in detect-secrets 1.5; plugins without
    an entry run unfiltered, so a new plugin is never skipped by mistake.
    """

    literals: tuple[str, ...] = ()
    lower_literals: tuple[str, ...] = ()
    min_token_run: int = 0

    def allows(self, probe: TextProbe) -> bool:
        """Whether the plugin has to run on ``probe``."""
        # The token-run fact is computed once per text and shared, so it is the cheaper test to try first.
        if not probe.has_token_run(self.min_token_run):
            return False
        if not (self.literals or self.lower_literals):
            return True
        return probe.contains_any(self.literals) or probe.contains_any_lower(self.lower_literals)


PLUGIN_GATES: dict[str, PluginGate] = {
    "ArtifactoryDetector": PluginGate(literals=("AKC", "AP")),
    "AWSKeyDetector": PluginGate(
        literals=("A3T", "ABIA", "ACCA", "AKIA", "ASIA"), lower_literals=("aws",), min_token_run=20
    ),
    "AzureStorageKeyDetector": PluginGate(literals=("AccountKey=",)),
    "BasicAuthDetector": PluginGate(literals=("://",)),
    "CloudantDetector": PluginGate(min_token_run=24),
    "DiscordBotTokenDetector": PluginGate(min_token_run=24),
    "GitHubTokenDetector": PluginGate(literals=("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), min_token_run=40),
    "GitLabTokenDetector": PluginGate(
        literals=(
            *("glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "GR1348941"),
            *("glcbt-", "glimt-", "glptt-", "glagent-", "gloas-"),
        ),
        min_token_run=20,
    ),
    "IbmCloudIamDetector": PluginGate(min_token_run=44),
    "IbmCosHmacDetector": PluginGate(min_token_run=48),
    "JwtTokenDetector": PluginGate(literals=("eyJ",)),
    "MailchimpDetector": PluginGate(literals=("-us",), min_token_run=36),
    "NpmDetector": PluginGate(literals=(":_authToken=",)),
    "OpenAIDetector": PluginGate(literals=("T3BlbkFJ",)),
    "PrivateKeyDetector": PluginGate(literals=("PRIVATE KEY", "PuTTY-User-Key-File")),
    "PypiTokenDetector": PluginGate(literals=("pypi-Ag",)),
    "SendGridDetector": PluginGate(literals=("SG.",)),
    "SlackDetector": PluginGate(lower_literals=("xox", "hooks.slack.com")),
    "SoftlayerDetector": PluginGate(min_token_run=64),
    "SquareOAuthDetector": PluginGate(literals=("sq0csp-",)),
    "StripeDetector": PluginGate(literals=("k_live_",)),
    "TelegramBotTokenDetector": PluginGate(min_token_run=35),
    "TwilioKeyDetector": PluginGate(literals=("AC", "SK"), min_token_run=34),
}


def available_plugin_names() -> frozenset[str]:
    """Class names of the detect-secrets plugins the redactor runs (``disabled_secret_plugins`` values)."""
    return frozenset(cls.__name__ for cls in _plugin_classes()) - _NEVER_RUN


def _plugin_classes() -> list[type[BasePlugin]]:
    return sorted(get_mapping_from_secret_type_to_class().values(), key=lambda cls: cls.__name__)


def _detector_name(plugin: BasePlugin) -> str:
    return f"detect-secrets:{type(plugin).__name__}"


def pem_block_end(text: str, header_end: int) -> int:
    """Where the private key whose header ends at ``header_end`` ends: its END line, else the end of text.

    A key without its END line (e.g. truncated in a log) is still sensitive, hence the fail-closed default.
    """
    end_match = _PEM_END.search(text, header_end) or _PUTTY_END.search(text, header_end)
    return end_match.end() if end_match else len(text)


class RegexPluginDetector:
    """Runs one regex-based detect-secrets plugin and reports the span of each secret it matches."""

    def __init__(self, plugin: RegexBasedDetector) -> None:
        self._plugin = plugin
        self._name = _detector_name(plugin)
        self.gate = PLUGIN_GATES.get(type(plugin).__name__)
        self._regexes: tuple[re.Pattern[str], ...] = tuple(plugin.denylist)
        # Plugins that override analyze_string refine their regex hits (JWT checks the parts decode);
        # honour that by re-asking the plugin about each hit.
        self._confirm = type(plugin).analyze_string is not RegexBasedDetector.analyze_string
        self._is_private_key = isinstance(plugin, PrivateKeyDetector)

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield a span per secret the plugin's regexes match in ``probe.text``, if its gate lets it run."""
        if self.gate is None or self.gate.allows(probe):
            yield from self.scan(probe)

    def scan(self, probe: TextProbe) -> Iterator[Span]:
        """Yield a span per secret the plugin's regexes match in ``probe.text`` (no prefilter)."""
        text = probe.text
        for regex in self._regexes:
            for match in regex.finditer(text):
                if self._confirm and not any(True for _ in self._plugin.analyze_string(match.group(0))):
                    continue
                if self._is_private_key:
                    start = match.start()
                    while start > 0 and text[start - 1] == "-":
                        start -= 1
                    yield Span(start, pem_block_end(text, match.end()), SECRET_KIND, self._name, RANK_SECRET)
                    continue
                start, end = _secret_bounds(match)
                while start < end and text[start] in _LEADING_DELIMITERS:
                    start += 1
                while end > start and text[end - 1] in _TRAILING_DELIMITERS:
                    end -= 1
                # Some plugins capture only a token's prefix (GitHub's ``(ghp|...)_...`` group).
                end = widen_right(text, end)
                if end > start:
                    yield Span(start, end, SECRET_KIND, self._name, RANK_SECRET)


class RegexPluginGroup:
    """All regex-based plugins behind one shared prefilter pass.

    Checking each plugin's gate on its own costs about a microsecond per plugin and text, which dominates
    on short strings (dict keys, labels); here each distinct literal is looked up once per text, and only
    the plugins whose literals occur (or that have none) are considered further.
    """

    def __init__(self, detectors: Iterable[RegexPluginDetector]) -> None:
        self._detectors = tuple(detectors)
        self._by_literal: dict[str, list[int]] = {}
        self._by_lower_literal: dict[str, list[int]] = {}
        self._without_literals: list[int] = []
        for index, detector in enumerate(self._detectors):
            gate = detector.gate
            if gate is None or not (gate.literals or gate.lower_literals):
                self._without_literals.append(index)
                continue
            for literal in gate.literals:
                self._by_literal.setdefault(literal, []).append(index)
            for literal in gate.lower_literals:
                self._by_lower_literal.setdefault(literal, []).append(index)

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield the spans of every plugin whose gate lets it run on ``probe``."""
        text = probe.text
        candidates = set(self._without_literals)
        for literal, indexes in self._by_literal.items():
            if literal in text:
                candidates.update(indexes)
        lower = probe.lower
        for literal, indexes in self._by_lower_literal.items():
            if literal in lower:
                candidates.update(indexes)
        for index in sorted(candidates):
            detector = self._detectors[index]
            if detector.gate is None or probe.has_token_run(detector.gate.min_token_run):
                yield from detector.scan(probe)


def _secret_bounds(match: re.Match[str]) -> tuple[int, int]:
    """The part of a plugin match that is the secret, by the plugin's own convention.

    detect-secrets treats a regex's non-empty groups as the secret when it has groups (``findall``
    semantics) and the whole match otherwise; the union of the group spans covers nested groups.
    """
    if not match.re.groups:
        return match.span()
    bounds = [match.span(i) for i in range(1, match.re.groups + 1) if match.start(i) < match.end(i)]
    if not bounds:
        return match.span()
    return min(s for s, _ in bounds), max(e for _, e in bounds)


class KeywordSecretDetector:
    """detect-secrets' keyword plugin: values assigned to secret-sounding names (``password = ...``).

    Uses the plugin's regex tables for every file type it knows (config, YAML, code, ...) since prompts and
    tool payloads mix them all. The regexes are case-insensitive alternations that cost about 0.15 us per
    character when run over a whole line, so the ones that begin with the keyword are only tried where a
    keyword starts, and the rest only on lines that mention one.
    """

    name = _detector_name(KeywordDetector())

    def __init__(self) -> None:
        tables: dict[re.Pattern[str], int] = {}
        for table in keyword_plugin.REGEX_BY_FILETYPE.values():
            tables.update(table)
        tables.update(keyword_plugin.QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP)
        starts_with_keyword = [
            (regex, group)
            for regex, group in tables.items()
            if regex.pattern.startswith(keyword_plugin.DENYLIST_REGEX)
        ]
        self._at_keyword: tuple[tuple[re.Pattern[str], int], ...] = tuple(starts_with_keyword)
        self._on_line: tuple[tuple[re.Pattern[str], int], ...] = tuple(
            item for item in tables.items() if item not in starts_with_keyword
        )

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield the values assigned to secret-sounding keywords."""
        if not probe.contains_any_lower(KEYWORD_HINTS):
            return
        text = probe.text
        lower = probe.lower
        if len(lower) == len(text):
            for start in _keyword_starts(lower):
                line_end = text.find("\n", start)
                line_end = len(text) if line_end < 0 else line_end
                for regex, group in self._at_keyword:
                    match = regex.match(text, start, line_end)
                    if match is not None:
                        yield from self._spans(text, match, group)
            line_regexes = self._on_line
        else:
            # A few characters change length when lowercased (e.g. "İ"), so positions found in ``lower``
            # would not point into ``text``: scan the lines with every regex instead.
            line_regexes = self._at_keyword + self._on_line
        for line_start, line_end in _lines_mentioning(text, lower, KEYWORD_HINTS):
            for regex, group in line_regexes:
                for match in regex.finditer(text, line_start, line_end):
                    yield from self._spans(text, match, group)

    def _spans(self, text: str, match: re.Match[str], group: int) -> Iterator[Span]:
        span = self._value_span(text, match, group)
        if span is not None:
            yield Span(span[0], span[1], SECRET_KIND, self.name, RANK_SECRET)

    @staticmethod
    def _value_span(text: str, match: re.Match[str], group: int) -> tuple[int, int] | None:
        start, end = match.span(group)
        if start < 0 or start >= end:
            return None
        quoted = start > 0 and text[start - 1] in _QUOTES and end < len(text) and text[end] == text[start - 1]
        if not quoted:
            # The plugin's unquoted value runs to the end of the line; in prose that would swallow the
            # rest of the sentence, so stop at the first separator.
            stop = _UNQUOTED_VALUE_END.search(text, start, end)
            if stop is not None:
                end = stop.start()
            if "(" in text[start:end] or "[" in text[start:end]:
                # An expression (``os.environ[...]``, ``vault.read(...)``), not a literal secret.
                return None
        value = text[start:end]
        if not is_real_value(value) or is_indirect_reference(match.group(0)):
            return None
        return start, end


def is_real_value(value: str) -> bool:
    """Whether a value assigned to a secret name is a literal, not a placeholder or a variable reference.

    ``{x}``, ``<x>``, ``${X}`` (detect-secrets' templated check), ``$NAME`` environment references and
    values without any letter or digit (``****``) are placeholders, not secrets.
    """
    if not value or not any(ch.isalnum() for ch in value):
        return False
    return not is_templated_secret(value) and not _ENV_REFERENCE.fullmatch(value)


def _keyword_starts(lower: str) -> list[int]:
    """Every position in ``lower`` where one of the keyword spellings begins."""
    starts: set[int] = set()
    for spelling in KEYWORD_SPELLINGS:
        position = lower.find(spelling)
        while position >= 0:
            starts.add(position)
            position = lower.find(spelling, position + 1)
    return sorted(starts)


def _lines_mentioning(text: str, lower: str, hints: Iterable[str]) -> list[tuple[int, int]]:
    """The (start, end) bounds of each line of ``text`` containing one of ``hints`` (found in ``lower``)."""
    lines: set[tuple[int, int]] = set()
    if len(lower) != len(text):
        # A few characters change length when lowercased (e.g. "İ"), so offsets in ``lower`` would not
        # point into ``text``; check line by line instead.
        line_start = 0
        for line in text.split("\n"):
            if any(hint in line.lower() for hint in hints):
                lines.add((line_start, line_start + len(line)))
            line_start += len(line) + 1
        return sorted(lines)
    for hint in hints:
        position = lower.find(hint)
        while position >= 0:
            line_start = text.rfind("\n", 0, position) + 1
            line_end = text.find("\n", position)
            if line_end < 0:
                line_end = len(text)
            lines.add((line_start, line_end))
            position = lower.find(hint, line_end)
    return sorted(lines)


class EntropySecretDetector:
    """detect-secrets' high-entropy plugins (base64 and hex) on every long token, quoted or not.

    Off by default: random-looking identifiers (hashes, UUID-free IDs, file digests) trigger it often.
    """

    def __init__(self, plugin: HighEntropyStringsPlugin) -> None:
        self._plugin = plugin
        self._name = _detector_name(plugin)
        self._tokens = re.compile(f"[{re.escape(plugin.charset)}]{{{_MIN_ENTROPY_TOKEN},}}")

    def find(self, probe: TextProbe) -> Iterator[Span]:
        """Yield each token whose Shannon entropy is above the plugin's limit."""
        if not probe.has_token_run(_MIN_ENTROPY_TOKEN):
            return
        plugin = self._plugin
        for match in self._tokens.finditer(probe.text):
            if plugin.calculate_shannon_entropy(match.group(0)) > plugin.entropy_limit:
                yield Span(match.start(), match.end(), SECRET_KIND, self._name, RANK_SECRET)


@lru_cache(maxsize=16)
def secret_plugin_detectors(
    disabled: frozenset[str], high_entropy: bool
) -> tuple[RegexPluginGroup | KeywordSecretDetector | EntropySecretDetector, ...]:
    """The detect-secrets detectors to run, built once per configuration (plugins are stateless)."""
    regex_plugins: list[RegexPluginDetector] = []
    detectors: list[RegexPluginGroup | KeywordSecretDetector | EntropySecretDetector] = []
    for cls in _plugin_classes():
        name = cls.__name__
        if name in disabled or name in _NEVER_RUN:
            continue
        if issubclass(cls, RegexBasedDetector):
            regex_plugins.append(RegexPluginDetector(cls()))
        elif issubclass(cls, KeywordDetector):
            detectors.append(KeywordSecretDetector())
        elif issubclass(cls, HighEntropyStringsPlugin) and name in _ENTROPY_PLUGINS and high_entropy:
            # The subclasses set their charset and default limit in __init__.
            detectors.append(EntropySecretDetector(cls()))  # type: ignore[call-arg]
    return (RegexPluginGroup(regex_plugins), *detectors)
