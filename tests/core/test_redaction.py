"""Tests for the redactor: each detector family with positives and near-misses, offsets, overlaps, objects."""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import string
from typing import Any

import pytest
from detect_secrets.plugins import keyword as keyword_plugin
from detect_secrets.plugins.base import RegexBasedDetector
from pydantic import ValidationError
from stdnum import luhn

from governed_ai.core.redaction import RedactionResult, RedactionSettings, Redactor, marker
from governed_ai.core.redaction.secret_plugins import (
    KEYWORD_HINTS,
    KEYWORD_SPELLINGS,
    PLUGIN_GATES,
    RegexPluginDetector,
    _plugin_classes,
    available_plugin_names,
)
from governed_ai.core.redaction.spans import (
    MIN_GATED_TOKEN_RUN,
    RANK_CUSTOM,
    RANK_PII,
    RANK_SECRET,
    Span,
    TextProbe,
    merge_overlapping,
)

# Secret-shaped values are generated, not written out, so no scanner mistakes this file for a leak.
_rng = random.Random(20240611)
_ALNUM = string.ascii_letters + string.digits
_LOWER_ALNUM = string.ascii_lowercase + string.digits


def _rand(alphabet: str, length: int) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(length))


def _b64url(data: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _pem(label: str) -> str:
    body = "\n".join(_rand(_ALNUM + "+/", 64) for _ in range(3))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----"


REDACTOR = Redactor()


def _only_finding(result: RedactionResult) -> tuple[str, int, int]:
    assert len(result.findings) == 1, result.findings
    finding = result.findings[0]
    return finding.kind, finding.start, finding.end


def _assert_redacted(text: str, raw: str, kind: str, redactor: Redactor = REDACTOR) -> RedactionResult:
    """``raw`` (occurring once in ``text``) is replaced by exactly one ``kind`` marker, and nothing else."""
    result = redactor.redact(text)
    start = text.index(raw)
    assert _only_finding(result) == (kind, start, start + len(raw))
    assert result.text == text[:start] + marker(kind) + text[start + len(raw) :]
    return result


def _assert_untouched(text: str, redactor: Redactor = REDACTOR) -> None:
    result = redactor.redact(text)
    assert result.findings == ()
    assert result.text == text


# --- detect-secrets plugins -------------------------------------------------------------------------------

# One (text, secret) sample per plugin the redactor runs; the secret is what must disappear.
_JWT = ".".join([_b64url({"alg": "HS256", "typ": "JWT"}), _b64url({"sub": "1234"}), _rand(_ALNUM, 43)])
_PLUGIN_SAMPLES: dict[str, tuple[str, str]] = {}


def _sample(plugin: str, template: str, secret: str) -> None:
    _PLUGIN_SAMPLES[plugin] = (template.format(secret), secret)


_sample("ArtifactoryDetector", "artifactory: AKC{} is the token", _rand(_ALNUM, 20))
_sample(
    "AWSKeyDetector", "aws id {} for the bucket", "AKIA" + _rand(string.ascii_uppercase + string.digits, 16)
)
_sample(
    "AzureStorageKeyDetector",
    "DefaultEndpointsProtocol=https;{};EndpointSuffix=x",
    "AccountKey=" + _rand(_ALNUM, 88),
)
_sample("BasicAuthDetector", "fetch https://deploy:{}@example.com/repo", _rand(_ALNUM, 12))
_sample("CloudantDetector", "cloudant_password='{}'", _rand("0123456789abcdef", 64))
_sample(
    "DiscordBotTokenDetector",
    "bot {} here",
    "M" + _rand(_ALNUM, 23) + "." + _rand(_ALNUM, 6) + "." + _rand(_ALNUM, 27),
)
_sample("GitHubTokenDetector", "use {} to push", "ghp_" + _rand(_ALNUM, 36))
_sample("GitLabTokenDetector", "use {} to push", "glpat-" + _rand(_ALNUM, 20))
_sample("IbmCloudIamDetector", "iam_api_key = {}", _rand(_ALNUM, 44))
_sample("IbmCosHmacDetector", "cos_hmac_secret_access_key: {}", _rand("0123456789abcdef", 48))
_sample("JwtTokenDetector", "session {} expired", _JWT)
_sample("MailchimpDetector", "mailchimp {} works", _rand(_LOWER_ALNUM, 32) + "-us12")
_sample("NpmDetector", "//registry.npmjs.org/:_authToken={}", "npm_" + _rand(_ALNUM, 36))
_sample("OpenAIDetector", "legacy {} key", "sk-" + _rand(_ALNUM, 20) + "T3BlbkFJ" + _rand(_ALNUM, 20))
_sample("PrivateKeyDetector", "key:\n{}\nend of message", _pem("RSA PRIVATE KEY"))
_sample("PypiTokenDetector", "upload with {}", "pypi-AgEIcHlwaS5vcmc" + _rand(_ALNUM, 80))
_sample("SendGridDetector", "mail via {}", "SG." + _rand(_ALNUM, 22) + "." + _rand(_ALNUM, 43))
_sample("SlackDetector", "slack {} bot", "xoxb-123456789012-" + _rand(_LOWER_ALNUM, 24))
_sample("SoftlayerDetector", "softlayer_api_key = {}", _rand(_LOWER_ALNUM, 64))
_sample("SquareOAuthDetector", "square {} oauth", "sq0csp-" + _rand(_ALNUM, 43))
_sample("StripeDetector", "charge with {}", "sk_live_" + _rand(_ALNUM, 24))
_sample("TelegramBotTokenDetector", "bot {} online", "123456789:" + _rand(_ALNUM, 35))
_sample("TwilioKeyDetector", "twilio {} account", "AC" + _rand(_LOWER_ALNUM, 32))
_sample("KeywordDetector", 'db_password = "{}"', _rand(_ALNUM, 12))


def test_every_plugin_the_redactor_runs_has_a_sample() -> None:
    # A new detect-secrets plugin must get a sample here, so its gate and span mapping get tested.
    assert set(_PLUGIN_SAMPLES) == available_plugin_names() - {
        "Base64HighEntropyString",
        "HexHighEntropyString",
    }


@pytest.mark.parametrize("plugin_name", sorted(_PLUGIN_SAMPLES))
def test_each_detect_secrets_plugin_is_redacted(plugin_name: str) -> None:
    text, secret = _PLUGIN_SAMPLES[plugin_name]
    result = REDACTOR.redact(text)
    assert secret not in result.text
    assert marker("SECRET") in result.text
    start = text.index(secret)
    # The finding covers the secret (possibly merged with a credential pattern over the same value).
    assert any(f.start <= start and start + len(secret) <= f.end for f in result.findings)
    # Text well away from the secret survives.
    assert text[:3] in result.text or start < 3


@pytest.mark.parametrize("plugin_name", sorted(set(_PLUGIN_SAMPLES) - {"KeywordDetector"}))
def test_each_regex_plugin_reports_the_span_of_its_secret(plugin_name: str) -> None:
    # The plugin alone (not merged with others) must map its hit to the secret's characters.
    (cls,) = [c for c in _plugin_classes() if c.__name__ == plugin_name]
    assert issubclass(cls, RegexBasedDetector)
    text, secret = _PLUGIN_SAMPLES[plugin_name]
    spans = list(RegexPluginDetector(cls()).find(TextProbe(text)))
    start = text.index(secret)
    assert spans, f"{plugin_name} found nothing"
    assert any(s.start <= start and start + len(secret) <= s.end for s in spans)
    if plugin_name != "PrivateKeyDetector":
        # Only the secret-bearing token, not the words around it.
        assert all(" " not in text[s.start : s.end] for s in spans)


def test_plugin_gates_only_ask_for_runs_the_probe_tracks() -> None:
    assert all(g.min_token_run == 0 or g.min_token_run >= MIN_GATED_TOKEN_RUN for g in PLUGIN_GATES.values())


def test_keyword_spellings_are_every_spelling_of_the_plugin_keywords() -> None:
    # Expanding "_?" is complete only if that is the sole regex syntax in the entries.
    assert all(re.fullmatch(r"(?:[a-zñ]|_\?)+", entry) for entry in keyword_plugin.DENYLIST)
    for spelling in KEYWORD_SPELLINGS:
        assert re.fullmatch(keyword_plugin.DENYLIST_REGEX, spelling, re.IGNORECASE)
    assert {"api_key", "apikey", "password", "contraseña"} <= set(KEYWORD_SPELLINGS)


def test_keyword_hints_cover_every_keyword_of_the_plugin() -> None:
    for entry in keyword_plugin.DENYLIST:
        for spelled in {entry.replace("_?", ""), entry.replace("_?", "_")}:
            assert any(hint in spelled for hint in KEYWORD_HINTS), entry


def test_jwt_that_does_not_decode_is_not_a_jwt() -> None:
    # detect-secrets' JWT plugin checks the header decodes to JSON; the redactor honours that refinement.
    fake = "eyJ" + _rand(string.ascii_lowercase, 12) + "." + _rand(string.ascii_lowercase, 12)
    _assert_untouched(f"value {fake} here")


# --- keyword assignments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ('password = "Tr0ub4dor&3"', "Tr0ub4dor&3"),
        ('{"api_key": "k3y-9f8e7d6c"}', "k3y-9f8e7d6c"),
        ("db_pass: s3cr3tValue", "s3cr3tValue"),
        ("PASSWD=letmein42", "letmein42"),
    ],
)
def test_keyword_assignment_replaces_only_the_value(text: str, secret: str) -> None:
    _assert_redacted(text, secret, "SECRET")


def test_unquoted_keyword_value_stops_at_the_first_separator() -> None:
    text = "password: hunter2x and then the rest of the sentence"
    result = REDACTOR.redact(text)
    assert result.text == "password: [REDACTED:SECRET] and then the rest of the sentence"


@pytest.mark.parametrize(
    "text",
    [
        "Please change your password regularly.",
        "The password:",
        "password = ",
        "password: <your password here>",
        "password = ${DB_PASSWORD}",
        "password=$DB_PASSWORD",
        "password = get_password()",
        "password: ********",
        'config = {"api_key": os.environ["OPENAI_API_KEY"]}',
        "db_password: vault.read(path)",
    ],
)
def test_keyword_without_a_literal_value_is_left_alone(text: str) -> None:
    _assert_untouched(text)


def test_keyword_line_after_text_that_changes_length_when_lowercased() -> None:
    # "İ" lowercases to two characters; offsets must still point into the original text.
    text = "İstanbul office\npassword = 'Sup3rS3cret'"
    _assert_redacted(text, "Sup3rS3cret", "SECRET")


# --- credential shapes beyond detect-secrets --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("postgres://app:Pa55w0rd@db.internal:5432/prod", "Pa55w0rd"),
        ("redis://:r3dispw@cache:6379/0", "r3dispw"),
        ("amqp://user:p@ss:w0rd@mq.example.com/vhost", "p@ss:w0rd"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("curl -H 'Authorization: Bearer abcDEF123ghiJKL456'", "abcDEF123ghiJKL456"),
        ("then send Bearer 9a8b7c6d5e4f3a2b1c0d with it", "9a8b7c6d5e4f3a2b1c0d"),
        ("OPENAI key sk-proj-" + "A1b2C3d4E5f6G7h8I9j0KlMn" + " in env", "sk-proj-A1b2C3d4E5f6G7h8I9j0KlMn"),
        ("Your API key: 8f3k2m9q1w7e6r5t.", "8f3k2m9q1w7e6r5t"),
        ("refresh_token=a1b2c3d4e5f6g7h8&scope=all", "a1b2c3d4e5f6g7h8"),
    ],
)
def test_credential_shapes_replace_only_the_credential(text: str, secret: str) -> None:
    _assert_redacted(text, secret, "SECRET")


@pytest.mark.parametrize(
    "text",
    [
        "He was the bearer of bad news.",
        "Send a Bearer token in the Authorization header.",
        "We use sk-learn and task-force-alpha-bravo-charlie-delta.",
        "max_tokens: 1024, token_count=512",
        "See https://example.com/path?user=alice for details.",
        "The API key: see the vault.",
    ],
)
def test_credential_near_misses_are_left_alone(text: str) -> None:
    _assert_untouched(text)


def test_encrypted_pem_block_is_replaced_whole_and_text_after_it_survives() -> None:
    block = _pem("ENCRYPTED PRIVATE KEY")
    text = f"before\n{block}\nafter the key"
    _assert_redacted(text, block, "SECRET")


def test_truncated_private_key_is_redacted_to_the_end() -> None:
    text = "log: -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA"
    result = REDACTOR.redact(text)
    assert result.text == "log: [REDACTED:SECRET]"


# --- known secrets ----------------------------------------------------------------------------------------


def test_known_secret_is_replaced_at_every_occurrence() -> None:
    value = _rand(_ALNUM, 10)
    redactor = Redactor(known_secrets=[value, "x"])
    text = f"first {value}, then again {value}."
    result = redactor.redact(text)
    assert result.text == "first [REDACTED:SECRET], then again [REDACTED:SECRET]."
    first = text.index(value)
    second = text.index(value, first + 1)
    assert [(f.start, f.end, f.detector) for f in result.findings] == [
        (first, first + 10, "known-secret"),
        (second, second + 10, "known-secret"),
    ]


def test_short_known_secret_is_ignored() -> None:
    redactor = Redactor(known_secrets=["abcd", "   ab   "])
    _assert_untouched("abcd is a common prefix; ab too", redactor)


def test_known_secret_minimum_length_is_configurable() -> None:
    redactor = Redactor(RedactionSettings(min_known_secret_length=3), known_secrets=["abc"])
    assert redactor.redact("abc def").text == "[REDACTED:SECRET] def"


def test_with_known_secrets_keeps_settings_and_replaces_the_values() -> None:
    base = Redactor(RedactionSettings(emails=False), known_secrets=["oldsecret1"])
    derived = base.with_known_secrets(["newsecret2"])
    assert derived.settings == base.settings
    result = derived.redact("oldsecret1 newsecret2 a@example.com")
    assert result.text == "oldsecret1 [REDACTED:SECRET] a@example.com"


def test_known_secret_containing_another_is_reported_once() -> None:
    redactor = Redactor(known_secrets=["innerpart", "outer-innerpart-x"])
    result = redactor.redact("value outer-innerpart-x end")
    assert result.text == "value [REDACTED:SECRET] end"
    assert len(result.findings) == 1


# --- personal data ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "email", ["alice.smith+tag@mail.example.co.uk", "o'brien@example.ie", "x_y@sub-domain.example.com"]
)
def test_email_is_redacted(email: str) -> None:
    _assert_redacted(f"Write to {email}, please.", email, "EMAIL")


def test_mailto_address_is_redacted_without_the_scheme() -> None:
    _assert_redacted("<a href='mailto:bob@example.org'>", "bob@example.org", "EMAIL")


@pytest.mark.parametrize("text", ["ping alice@localhost now", "user@server is down", "an @mention here"])
def test_email_without_a_tld_is_left_alone(text: str) -> None:
    _assert_untouched(text)


def test_url_userinfo_is_a_password_not_an_email() -> None:
    result = REDACTOR.redact("https://bob:hunter22@example.com/x")
    assert result.text == "https://bob:[REDACTED:SECRET]@example.com/x"


@pytest.mark.parametrize(
    "phone", ["(415) 555-2671", "415-555-2671", "+44 20 7946 0958", "+49 30 901820", "+1 212 555 0123"]
)
def test_valid_phone_number_is_redacted(phone: str) -> None:
    _assert_redacted(f"Call {phone} today.", phone, "PHONE")


@pytest.mark.parametrize(
    "text",
    [
        "Order 123-456-7890 shipped.",
        "Meeting on 2024-11-03 at 10:30.",
        "ID 0000000",
        # The digits "2024000123" alone would be a valid US number; as part of a code they are not one.
        "Invoice INV-2024-000123 is paid.",
        "build 2024000123-rc1",
    ],
)
def test_phone_like_number_that_is_not_valid_is_left_alone(text: str) -> None:
    _assert_untouched(text)


def test_phone_region_decides_national_numbers_but_not_international_ones() -> None:
    no_region = Redactor(RedactionSettings(default_phone_region=None))
    _assert_untouched("Call (415) 555-2671 today.", no_region)
    _assert_redacted("Call +44 20 7946 0958 today.", "+44 20 7946 0958", "PHONE", no_region)
    uk = Redactor(RedactionSettings(default_phone_region="gb"))
    _assert_redacted("Call 020 7946 0958 today.", "020 7946 0958", "PHONE", uk)
    _assert_untouched("Call 020 7946 0958 today.", REDACTOR)


@pytest.mark.parametrize(
    "card", ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005", "4012888888881881"]
)
def test_luhn_valid_card_number_is_redacted(card: str) -> None:
    assert luhn.is_valid(card.replace(" ", "").replace("-", ""))
    _assert_redacted(f"Card: {card}.", card, "PAYMENT_CARD")


def test_sixteen_digits_failing_luhn_are_left_alone() -> None:
    number = "4111111111111112"
    assert not luhn.is_valid(number)
    _assert_untouched(f"Card: {number}.")


def test_luhn_valid_number_outside_card_networks_is_left_alone() -> None:
    # An epoch-millisecond timestamp that happens to pass Luhn.
    timestamp = "171800000000" + luhn.calc_check_digit("171800000000")
    assert luhn.is_valid(timestamp)
    _assert_untouched(f"ts={timestamp}")


def test_card_digits_inside_a_longer_number_are_left_alone() -> None:
    _assert_untouched("serial 94111111111111111")


@pytest.mark.parametrize(
    "iban", ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "FR1420041010050500013M02606"]
)
def test_valid_iban_is_redacted_and_following_words_survive(iban: str) -> None:
    _assert_redacted(f"Pay to {iban} AND 2 more", iban, "IBAN")


@pytest.mark.parametrize(
    "text", ["Pay to DE88 3704 0044 0532 0130 00 now", "Pay to GB82WEST1234569876543 now"]
)
def test_iban_with_wrong_check_digits_or_length_is_left_alone(text: str) -> None:
    _assert_untouched(text)


def test_ip_addresses_are_opt_in() -> None:
    text = "host 203.0.113.7 answered"
    _assert_untouched(text)
    with_ip = Redactor(RedactionSettings(ip_addresses=True))
    _assert_redacted(text, "203.0.113.7", "IP_ADDRESS", with_ip)
    _assert_untouched("version 1.2.3.4.5 and 256.1.1.1", with_ip)


# --- several findings, overlaps, idempotence --------------------------------------------------------------


def test_several_findings_have_offsets_into_the_original_text() -> None:
    github = "ghp_" + _rand(_ALNUM, 36)
    text = f"Mail carol@example.com, call (415) 555-2671, token {github}, card 4111111111111111."
    result = REDACTOR.redact(text)
    expected = [
        ("EMAIL", "carol@example.com"),
        ("PHONE", "(415) 555-2671"),
        ("SECRET", github),
        ("PAYMENT_CARD", "4111111111111111"),
    ]
    assert [(f.kind, text[f.start : f.end]) for f in result.findings] == expected
    assert result.text == (
        "Mail [REDACTED:EMAIL], call [REDACTED:PHONE], token [REDACTED:SECRET], card [REDACTED:PAYMENT_CARD]."
    )
    assert result.counts_by_kind() == {"EMAIL": 1, "PHONE": 1, "SECRET": 1, "PAYMENT_CARD": 1}


def test_finding_inside_a_longer_one_is_absorbed_by_it() -> None:
    settings = RedactionSettings(custom_patterns=[("first_name", r"alice")])
    result = Redactor(settings).redact("to alice.smith@example.com now")
    assert _only_finding(result) == ("EMAIL", 3, 26)
    assert result.text == "to [REDACTED:EMAIL] now"


def test_partially_overlapping_findings_are_merged_so_nothing_leaks() -> None:
    settings = RedactionSettings(custom_patterns=[("left", r"XY-\d+"), ("right", r"\d+-4567")])
    result = Redactor(settings).redact("ref XY-123-4567 end")
    # "right" (8 chars) is longer than "left" (6 chars) and labels the merged span.
    assert _only_finding(result) == ("RIGHT", 4, 15)
    assert result.text == "ref [REDACTED:RIGHT] end"


def test_known_secret_overlapping_a_detected_password_is_one_finding() -> None:
    redactor = Redactor(known_secrets=["S3cretPassw0rd"])
    result = redactor.redact("postgres://u:S3cretPassw0rd@host/db")
    assert result.text == "postgres://u:[REDACTED:SECRET]@host/db"
    assert len(result.findings) == 1


def test_merge_overlapping_rules() -> None:
    spans = [
        Span(0, 4, "A", "a", RANK_PII),
        Span(4, 8, "B", "b", RANK_PII),  # touches A: stays separate
        Span(10, 20, "C", "c", RANK_PII),
        Span(15, 25, "D", "d", RANK_SECRET),  # same length as C, lower rank wins the label
        Span(30, 40, "E", "e", RANK_CUSTOM),
        Span(32, 35, "F", "f", RANK_SECRET),  # nested: the longer E labels
    ]
    merged = merge_overlapping(spans)
    assert [(s.start, s.end, s.kind) for s in merged] == [
        (0, 4, "A"),
        (4, 8, "B"),
        (10, 25, "D"),
        (30, 40, "E"),
    ]


def test_redacting_twice_changes_nothing() -> None:
    settings = RedactionSettings(custom_patterns=[("word", r"REDACTED|EMAIL")])
    redactor = Redactor(settings)
    once = redactor.redact("mail dave@example.com, password = 'x9y8z7w6'")
    twice = redactor.redact(once.text)
    assert once.changed
    assert twice.text == once.text
    assert twice.findings == ()


def test_empty_text_and_wrong_type() -> None:
    assert REDACTOR.redact("") == RedactionResult(text="")
    with pytest.raises(TypeError):
        REDACTOR.redact(b"bytes")  # type: ignore[arg-type]


# --- structures -------------------------------------------------------------------------------------------


def test_redact_obj_redacts_nested_strings_and_preserves_everything_else() -> None:
    github = "ghp_" + _rand(_ALNUM, 36)
    original: dict[object, Any] = {
        "prompt": "mail erin@example.com",
        "count": 3,
        "ratio": 0.5,
        "ok": True,
        "missing": None,
        "items": [{"token": github}, ("tuple", 7), [1, 2.5, "plain"]],
        5: "numeric key stays",
    }
    snapshot = copy.deepcopy(original)
    redacted = REDACTOR.redact_obj(original)
    assert redacted == {
        "prompt": "mail [REDACTED:EMAIL]",
        "count": 3,
        "ratio": 0.5,
        "ok": True,
        "missing": None,
        "items": [{"token": "[REDACTED:SECRET]"}, ("tuple", 7), [1, 2.5, "plain"]],
        5: "numeric key stays",
    }
    assert type(redacted["ok"]) is bool
    assert type(redacted["count"]) is int
    assert isinstance(redacted["items"][1], tuple)
    # The input is not modified.
    assert original == snapshot


def test_redact_obj_redacts_keys_and_keeps_colliding_entries() -> None:
    redacted = REDACTOR.redact_obj({"a@example.com": 1, "b@example.com": 2, "[REDACTED:EMAIL]": 0})
    assert redacted == {"[REDACTED:EMAIL]#2": 1, "[REDACTED:EMAIL]#3": 2, "[REDACTED:EMAIL]": 0}


def test_redact_obj_detailed_reports_paths() -> None:
    result = REDACTOR.redact_obj_detailed(
        {"users": [{"contact": "x frank@example.com"}], "grace@example.com": "v"}
    )
    located = sorted((f.path, f.in_key, f.kind, f.start, f.end) for f in result.findings)
    assert located == [
        (("[REDACTED:EMAIL]",), True, "EMAIL", 0, 17),
        (("users", 0, "contact"), False, "EMAIL", 2, 19),
    ]
    assert result.counts_by_kind() == {"EMAIL": 2}


def test_redact_obj_on_a_plain_string_and_a_number() -> None:
    assert REDACTOR.redact_obj("h@example.com") == "[REDACTED:EMAIL]"
    assert REDACTOR.redact_obj(4111111111111111) == 4111111111111111


# --- custom patterns and settings -------------------------------------------------------------------------


def test_custom_patterns_from_strings_and_compiled_regexes() -> None:
    settings = RedactionSettings(
        custom_patterns=[("ticket-id", r"TCK-\d{4}"), ("employee", re.compile(r"emp\d{6}", re.IGNORECASE))]
    )
    result = Redactor(settings).redact("see TCK-1234 by EMP123456")
    assert result.text == "see [REDACTED:TICKET_ID] by [REDACTED:EMPLOYEE]"
    assert [f.detector for f in result.findings] == ["custom:ticket-id", "custom:employee"]


def test_custom_pattern_that_matches_empty_strings_finds_nothing() -> None:
    _assert_untouched("abc", Redactor(RedactionSettings(custom_patterns=[("opt", r"z*")])))


@pytest.mark.parametrize("name", ["", "---", "!!"])
def test_custom_pattern_needs_a_usable_name(name: str) -> None:
    with pytest.raises(ValidationError):
        RedactionSettings(custom_patterns=[(name, r"x")])


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValidationError):
        RedactionSettings(default_phone_region="XX")
    with pytest.raises(ValidationError):
        RedactionSettings(disabled_secret_plugins=frozenset({"NoSuchDetector"}))
    with pytest.raises(ValidationError):
        RedactionSettings(emailz=False)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        RedactionSettings(custom_patterns=[("broken", r"(unclosed")])


_GITHUB = "ghp_" + _rand(_ALNUM, 36)


@pytest.mark.parametrize(
    ("switch", "text", "kind"),
    [
        ({"secrets": False}, f"push with {_GITHUB} now", "SECRET"),
        (
            # The random-token detector would still catch the token's random body on its own.
            {"disabled_secret_plugins": frozenset({"GitHubTokenDetector"}), "random_tokens": False},
            f"push with {_GITHUB} now",
            "SECRET",
        ),
        (
            {"random_tokens": False},
            "the matching secret is wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "SECRET",
        ),
        ({"emails": False}, "mail ivan@example.com", "EMAIL"),
        ({"phone_numbers": False}, "call (415) 555-2671", "PHONE"),
        ({"payment_cards": False}, "card 4111 1111 1111 1111", "PAYMENT_CARD"),
        ({"ibans": False}, "iban DE89370400440532013000", "IBAN"),
        ({"custom": False, "custom_patterns": [("ticket", r"TCK-\d+")]}, "see TCK-42", "TICKET"),
    ],
)
def test_switching_a_detector_off_stops_its_findings(switch: dict[str, object], text: str, kind: str) -> None:
    on_settings = {k: v for k, v in switch.items() if k == "custom_patterns"}
    assert marker(kind) in Redactor(RedactionSettings.model_validate(on_settings)).redact(text).text
    _assert_untouched(text, Redactor(RedactionSettings.model_validate(switch)))


def test_high_entropy_strings_are_opt_in() -> None:
    # Random (4.8 bits per character) but without upper case: not for the random-token detector, which
    # wants every character class a key has.
    blob = "a20inr1tdyeg1wmz90o6+7/jpesq6dv3og1x54uo"
    text = f"checksum {blob} attached"
    _assert_untouched(text)
    _assert_redacted(text, blob, "SECRET", Redactor(RedactionSettings(high_entropy_secrets=True)))


def test_settings_survive_a_json_round_trip() -> None:
    settings = RedactionSettings(custom_patterns=[("ticket", r"(?i)tck-\d+")], default_phone_region="de")
    again = RedactionSettings.model_validate_json(settings.model_dump_json())
    assert again == settings
    assert Redactor(again).redact("see tck-9").text == "see [REDACTED:TICKET]"


# --- the raw secret never escapes -------------------------------------------------------------------------


def test_raw_values_never_appear_in_findings_results_or_reprs() -> None:
    known = _rand(_ALNUM, 16)
    github = "ghp_" + _rand(_ALNUM, 36)
    password = _rand(_ALNUM, 14)
    raws = [known, github, password, "judy@example.com", "4111 1111 1111 1111"]
    redactor = Redactor(known_secrets=[known])
    text = f"{known} {github} password='{password}' judy@example.com 4111 1111 1111 1111"
    result = redactor.redact(text)
    detailed = redactor.redact_obj_detailed({"a": [text]})
    assert len(result.findings) == len(raws)
    exposed = [
        result.text,
        repr(result),
        str(result),
        result.model_dump_json(),
        repr(result.findings),
        repr(detailed),
        detailed.model_dump_json(),
        repr(redactor),
        repr(redactor.settings),
    ]
    for raw in raws:
        for surface in exposed:
            assert raw not in surface
