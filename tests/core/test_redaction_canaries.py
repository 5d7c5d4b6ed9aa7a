"""Canary secrets and PII of every kind the security review planted, in every form, at the redactor level;
and the ids the project writes itself, which must pass untouched."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import uuid

import pytest

from governed_ai.core.keys import DeploymentKey, keyed_digest
from governed_ai.core.prompt_version import prompt_version
from governed_ai.core.redaction import RedactionSettings, Redactor
from governed_ai.core.redaction.random_tokens import class_change_rate, looks_random
from governed_ai.core.retrieval.documents import chunk_id


def _b64url(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
OPENAI_KEY = "sk-proj-" + "Q3bY7kLm2Np9Rs4Tv6Wx8Za1Cd5Ef0Gh3Jk7Mn2Pq9Rt4Uv6Wy8Xb1"
GITHUB_TOKEN = "ghp_" + "Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LmNb12"
JWT = ".".join(
    (
        _b64url({"alg": "HS256", "typ": "JWT"}),
        _b64url({"sub": "1234567890", "name": "Jane Roe", "iat": 1516239022}),
        "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    )
)
PRIVATE_KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi6Z8p0tNp0fVNd3Xq2rG7Bn3Xa\n"
    "k8Xw1Q9s5FJ0Zr2bV7tLhA0cE4pQ6mN8yWuR3sK1dT7vB2nM5xC9qL4wZ8jH6fG\n"
    "-----END RSA PRIVATE KEY-----"
)
DB_PASSWORD = "S3cr3t-Pa55word-77"
EMAIL = "jane.roe@example.com"
PHONE = "+44 20 7946 0958"
IBAN = "DE89 3704 0044 0532 0130 00"
CARD = "4111 1111 1111 1111"

# (label, text holding the canary, the canary, the kind it must be redacted as)
CANARIES = [
    ("aws key id in prose", f"the access key id is {AWS_KEY_ID} for the loader", AWS_KEY_ID, "SECRET"),
    ("aws key id assigned", f"aws_access_key_id = {AWS_KEY_ID}", AWS_KEY_ID, "SECRET"),
    ("aws secret in prose", f"the matching secret is {AWS_SECRET}", AWS_SECRET, "SECRET"),
    ("aws secret assigned", f"aws_secret_access_key={AWS_SECRET}", AWS_SECRET, "SECRET"),
    ("aws secret quoted in JSON", json.dumps({"note": f"use {AWS_SECRET} today"}), AWS_SECRET, "SECRET"),
    ("aws secret at line end", f"secret:\n{AWS_SECRET}\n", AWS_SECRET, "SECRET"),
    ("openai project key", f"my key is {OPENAI_KEY}.", OPENAI_KEY, "SECRET"),
    ("github token", f"deploy with {GITHUB_TOKEN} please", GITHUB_TOKEN, "SECRET"),
    ("jwt", f"Authorization came with {JWT} attached", JWT, "SECRET"),
    ("private key block", f"here is the key:\n{PRIVATE_KEY}\nthanks", PRIVATE_KEY, "SECRET"),
    (
        "password in a uri",
        f"connect to postgres://loader:{DB_PASSWORD}@db.internal/sales",
        DB_PASSWORD,
        "SECRET",
    ),
    ("e-mail", f"write to {EMAIL} about it", EMAIL, "EMAIL"),
    ("phone", f"call me on {PHONE} tomorrow", PHONE, "PHONE"),
    ("iban", f"refund to {IBAN} please", IBAN, "IBAN"),
    ("card", f"paid with {CARD} yesterday", CARD, "PAYMENT_CARD"),
]


@pytest.mark.parametrize(("text", "canary", "kind"), [c[1:] for c in CANARIES], ids=[c[0] for c in CANARIES])
def test_every_canary_is_redacted(text: str, canary: str, kind: str) -> None:
    result = Redactor().redact(text)
    assert canary not in result.text
    # Not even a recognisable piece of it is left (a partial match would leak the rest).
    assert canary[len(canary) // 3 : 2 * len(canary) // 3] not in result.text
    assert f"[REDACTED:{kind}]" in result.text


def test_random_keys_of_the_aws_shape_are_caught_not_just_the_documented_example() -> None:
    redactor = Redactor()
    missed = []
    for _ in range(500):
        key = base64.b64encode(secrets.token_bytes(30)).decode()  # 40 characters, like an AWS secret
        if key in redactor.redact(f"the matching secret is {key} ok").text:
            missed.append(key)
    # A random key lacks a digit (or is otherwise too regular) well under 1% of the time.
    assert len(missed) <= 5, missed


def test_the_ids_and_hashes_the_project_writes_are_not_flagged() -> None:
    key = DeploymentKey.from_text("canary-test-key-0123456789abcdef", source="test")
    text = "Ticket T-1042: the parcel arrived damaged and the customer wants a replacement."
    digest = hashlib.sha256(text.encode()).hexdigest()
    ids = [
        digest,
        digest[:24],
        chunk_id("knowledge_base/refunds.md", text),
        prompt_version("Classify: {{ item.text }}", name="triage", version="v1").id,
        "triage@v1#abcdef012345",
        keyed_digest(key, "batch-item-key", "jane.roe@example.com"),
        str(uuid.uuid4()),
        uuid.uuid4().hex,
        base64.b64encode(text.encode()).decode(),
        base64.urlsafe_b64encode(json.dumps({"ticket_id": "T-1042", "text": text}).encode()).decode(),
        "AbstractSingletonProxyFactoryBean2Impl",
        "https://www.youtube.com/vi/d1elMD9WgpA/maxresdefault.jpg",
    ]
    redactor = Redactor()
    for value in ids:
        sentence = f"Stored as {value} in the audit trail."
        assert redactor.redact(sentence).text == sentence, value


def test_the_random_token_rules() -> None:
    assert looks_random(AWS_SECRET)
    assert not looks_random("9f86d081884c7d659a2feaf0c55ad015a3bf4f1b")  # hex: a git SHA, not a key
    assert not looks_random("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd")  # sequential
    assert not looks_random("ThisIsAVeryLongCamelCaseIdentifierName2")  # words, not random
    assert class_change_rate("aaaa") == 0.0 and class_change_rate("aA1/") == 1.0
    # The detector can be switched off (e.g. for a corpus of hashes in an unusual alphabet).
    quiet = Redactor(RedactionSettings(random_tokens=False))
    assert AWS_SECRET in quiet.redact(f"the matching secret is {AWS_SECRET}").text
