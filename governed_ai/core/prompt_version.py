"""Stable identifiers for prompt templates, so audit records and metrics can say which prompt produced what.

The id hashes the template BEFORE rendering (so every ticket classified with the same template shares one
id) and the system prompt when given. Cosmetic edits (line endings, trailing whitespace, blank lines at the
start or end) keep the id; any other change, including indentation or inner blank lines, changes it.
"""

from __future__ import annotations

import hashlib
import json
import re

from pydantic import BaseModel, ConfigDict

_SHORT_HASH_LENGTH = 12
_LINE_ENDINGS = re.compile(r"\r\n?")
_NAME_FORBIDDEN = frozenset("@#")


class PromptVersion(BaseModel):
    """A prompt template's identity: ``name@version#<hash12>``, ``name#<hash12>`` or ``sha256:<hash12>``."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None
    version: str | None
    sha256: str
    """Full hex digest of the normalised template (and system prompt)."""

    @property
    def short_hash(self) -> str:
        """The first 12 hex characters of ``sha256``, as used in ``id``."""
        return self.sha256[:_SHORT_HASH_LENGTH]

    def __str__(self) -> str:
        return self.id


def normalise_prompt(text: str) -> str:
    """The form that is hashed: ``\\n`` line endings, no trailing whitespace, no blank lines at either end."""
    lines = [line.rstrip() for line in _LINE_ENDINGS.sub("\n", text).split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def prompt_version(
    template: str,
    *,
    name: str | None = None,
    version: str | None = None,
    system_prompt: str | None = None,
) -> PromptVersion:
    """Identify a prompt template (before rendering) and, optionally, its separate system prompt.

    Raises ``ValueError`` for a version without a name, or names/versions containing the id separators.
    """
    if version is not None and name is None:
        raise ValueError("a prompt version needs a name: prompt_version(template, name=..., version=...)")
    if name is not None and (not name.strip() or _NAME_FORBIDDEN.intersection(name)):
        raise ValueError(f"prompt name {name!r} must be non-empty and must not contain '@' or '#'")
    if version is not None and (not version.strip() or "#" in version):
        raise ValueError(f"prompt version {version!r} must be non-empty and must not contain '#'")
    # JSON framing keeps "system + template" unambiguous: no template can collide with a system/template pair.
    payload = json.dumps(
        {
            "system": normalise_prompt(system_prompt) if system_prompt is not None else None,
            "template": normalise_prompt(template),
        },
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    short = digest[:_SHORT_HASH_LENGTH]
    if name is None:
        prompt_id = f"sha256:{short}"
    elif version is None:
        prompt_id = f"{name}#{short}"
    else:
        prompt_id = f"{name}@{version}#{short}"
    return PromptVersion(id=prompt_id, name=name, version=version, sha256=digest)
