"""How batch item keys appear in a task's own outputs (results and failures files, XCom, log lines).

The audit trail and the replay journal never hold an item's key, only a keyed digest of it. The task's
outputs are different: results must join with their inputs, so keys stay as given where that is safe.
The policy decides (``output_item_keys``, see :mod:`governed_ai.core.policy.document`):

- ``redacted`` (default): a key in which the redactor finds a secret, personal data (an e-mail address
  used as a ticket id, a card number) or a policy's custom pattern is replaced by ``digest:<16 hex>``;
  other keys are kept;
- ``allow_pii``: personal data may appear in keys as given; a key holding a secret or a custom pattern is
  still replaced (a secret never appears in outputs);
- ``digest``: every key is replaced.

``<16 hex>`` is the digest the audit trail records for the item (its ``item`` field), so a replaced key
can still be followed into the audit trail; rows also keep the item's ``position`` in the input.
"""

from __future__ import annotations

from collections.abc import Callable

from governed_ai.core.governor import Governor
from governed_ai.core.policy import RedactionSettings
from governed_ai.core.redaction import report_secrets
from governed_ai.core.redaction.pii import (
    EMAIL_KIND,
    IBAN_KIND,
    IP_ADDRESS_KIND,
    PAYMENT_CARD_KIND,
    PHONE_KIND,
)
from governed_ai.core.subject import Subject

DIGEST_PREFIX = "digest:"
#: What ``allow_pii`` lets through: the built-in personal-data kinds, never secrets or custom patterns.
PERSONAL_DATA_KINDS = frozenset({EMAIL_KIND, PHONE_KIND, PAYMENT_CARD_KIND, IBAN_KIND, IP_ADDRESS_KIND})


class ItemKeyPresenter:
    """What the task's outputs may show of each item's key, as the policy says when the batch starts.

    ``digest`` gives an item's audit digest (the governed client's ``item_digest``)."""

    def __init__(self, governor: Governor, subject: Subject, digest: Callable[[str], str]) -> None:
        self._governor = governor
        self._redaction = governor.engine().redaction_for(subject)
        self._digest = digest

    def __call__(self, key: str) -> str:
        if _may_show(self._governor, key, self._redaction):
            return key
        return DIGEST_PREFIX + self._digest(key)


def _may_show(governor: Governor, key: str, redaction: RedactionSettings) -> bool:
    mode = redaction.output_item_keys
    if mode == "digest":
        return False
    result = governor.redactor_for(redaction).redact(key)
    if governor.on_secret_found is not None:
        # Airflow's masker then hides the secret wherever else it shows up (an error message, a log line).
        report_secrets(key, result, governor.on_secret_found)
    if governor.mask(key) != key:  # a value Airflow's masker knows (a connection password, a variable)
        return False
    kinds = {finding.kind for finding in result.findings}
    if mode == "allow_pii":
        return kinds <= PERSONAL_DATA_KINDS
    return not kinds
