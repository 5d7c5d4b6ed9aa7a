"""The deployment's secret key, and keyed digests derived from it for each purpose.

One secret per deployment (configured outside the governance database: an Airflow connection, a
secrets backend, or a key file on the machine) serves several purposes: the audit chain's HMAC, the
anchors of its head, and keyed hashes of values that must not be stored in the clear (e.g. batch item
keys that may be e-mail addresses). Each purpose gets its own sub-key, ``HMAC-SHA256(secret, "governed_ai/"
+ purpose)``, so a digest made for one purpose can never be replayed as one for another, and knowing a
purpose's digests says nothing about the secret.

This module never learns where the key comes from: the governance hook resolves it and passes it in, so
the core stays free of Airflow.

Typical use::

    key = DeploymentKey.from_text(secret_text, source="connection governed_ai_governance_default")
    item_key_hash = keyed_digest(key, "batch-item-key", "jane.roe@example.com")   # 64 hex characters
    hasher = key.hasher("audit-chain")                                            # reusable, thread-safe
    hasher.hexdigest(b"...")
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

#: Minimum length of a key given as text; shorter secrets are too easy to guess offline.
MIN_KEY_BYTES = 16
#: Bytes of a generated key (:func:`generate_key_text` and the development key file).
GENERATED_KEY_BYTES = 32
_PURPOSE_PREFIX = b"governed_ai/"
logger = logging.getLogger(__name__)
_KEY_ID_PURPOSE = "key-id"


class InvalidKey(ValueError):
    """A key was given but cannot be used (too short, empty)."""


def generate_key_text() -> str:
    """A new random key as 64 hex characters, suitable for ``[governed_ai] audit_hmac_key``."""
    return secrets.token_hex(GENERATED_KEY_BYTES)


@dataclass(frozen=True, slots=True)
class KeyedHasher:
    """HMAC-SHA256 under the sub-key of one purpose. Immutable and safe to share between threads."""

    purpose: str
    _subkey: bytes = field(repr=False)

    def hexdigest(self, data: bytes) -> str:
        """The 64-hex-character HMAC of ``data``."""
        return hmac.new(self._subkey, data, hashlib.sha256).hexdigest()

    def digest_text(self, text: str) -> str:
        """The 64-hex-character HMAC of ``text`` encoded as UTF-8."""
        return self.hexdigest(text.encode("utf-8"))

    def matches(self, data: bytes, expected_hex: str) -> bool:
        """Whether ``expected_hex`` is the HMAC of ``data`` (compared in constant time)."""
        return hmac.compare_digest(self.hexdigest(data), expected_hex)


@dataclass(frozen=True, slots=True)
class DeploymentKey:
    """The deployment's secret. ``source`` says where it came from (for messages; never the value).

    ``repr`` and ``str`` never show the secret. Use :meth:`hasher` for a purpose-specific HMAC, or
    :func:`keyed_digest` for a one-off digest.
    """

    _secret: bytes = field(repr=False)
    source: str = "<unspecified>"

    def __post_init__(self) -> None:
        if len(self._secret) < MIN_KEY_BYTES:
            raise InvalidKey(
                f"the key from {self.source} is {len(self._secret)} bytes; at least {MIN_KEY_BYTES} are "
                f"needed (generate one with: python -c 'import secrets; print(secrets.token_hex(32))')"
            )

    @classmethod
    def from_text(cls, text: str, *, source: str) -> DeploymentKey:
        """A key from configuration text; surrounding whitespace (a trailing newline in a file) is ignored.

        The text is used as it is (UTF-8), not hex-decoded, so any string of enough length works.
        """
        return cls(text.strip().encode("utf-8"), source=source)

    def hasher(self, purpose: str) -> KeyedHasher:
        """The keyed hasher of ``purpose`` (e.g. ``"audit-chain"``, ``"batch-item-key"``)."""
        if not purpose:
            raise ValueError("purpose must be a non-empty string")
        return KeyedHasher(purpose, _subkey(self._secret, purpose))

    @property
    def key_id(self) -> str:
        """A short public fingerprint of the key (16 hex characters): tells which key wrote something,
        reveals nothing about it."""
        return self.hasher(_KEY_ID_PURPOSE).hexdigest(b"")[:16]

    def __str__(self) -> str:
        return f"DeploymentKey(id={self.key_id}, source={self.source})"


@lru_cache(maxsize=64)
def _subkey(secret: bytes, purpose: str) -> bytes:
    # Cached: keyed_digest is called per batch item, and deriving the sub-key is a second HMAC each time.
    return hmac.new(secret, _PURPOSE_PREFIX + purpose.encode("utf-8"), hashlib.sha256).digest()


def keyed_digest(key: DeploymentKey, purpose: str, text: str) -> str:
    """``HMAC-SHA256`` of ``text`` (UTF-8) under ``key``'s sub-key for ``purpose``, as 64 hex characters.

    Use it wherever a value must be recognisable (equal inputs give equal digests, so joins and
    de-duplication still work) but must not be readable or guessable from what is stored: e.g. batch item
    keys in the audit trail and the replay journal. Without the key, nobody can test a guess (an e-mail
    address, a customer id) against a stored digest, which a plain SHA-256 would allow.

    Different purposes give unrelated digests for the same text.
    """
    return key.hasher(purpose).digest_text(text)


def read_key_file(path: Path) -> DeploymentKey | None:
    """The key stored in ``path``, or None if there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return DeploymentKey.from_text(text, source=f"key file {path}")


def load_or_create_key_file(path: Path) -> DeploymentKey:
    """The key in ``path``, created (random, mode 0600) if the file does not exist yet.

    Meant for a single machine (development, ``airflow standalone``): every worker that creates its own
    file has its own key, and a chain written by several keys never verifies. Logs a warning when it
    creates the file. Safe when several processes race to create it: the file appears atomically, and the
    losers read the winner's key.
    """
    existing = read_key_file(path)
    if existing is not None:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".audit-key-")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (generate_key_text() + "\n").encode("ascii"))
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(temporary, path)  # fails if another process created the file first
            logger.warning(
                "created a new audit key in %s (single-machine fallback): deployments with more than one "
                "worker must configure one shared key ([governed_ai] audit_hmac_key, a secrets backend, or "
                "the governance connection's password), or their audit chains will not verify",
                path,
            )
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)
    key = read_key_file(path)
    assert key is not None
    return key


__all__ = [
    "GENERATED_KEY_BYTES",
    "MIN_KEY_BYTES",
    "DeploymentKey",
    "InvalidKey",
    "KeyedHasher",
    "generate_key_text",
    "keyed_digest",
    "load_or_create_key_file",
    "read_key_file",
]
