"""Prompt template ids: stable under cosmetic edits, sensitive to every real change."""

from __future__ import annotations

import re

import pytest

from governed_ai.core.prompt_version import normalise_prompt, prompt_version

TEMPLATE = "Classify this ticket.\n  Ticket: {{ ticket }}\nAnswer in JSON."


@pytest.mark.parametrize(
    "cosmetic",
    [
        TEMPLATE.replace("\n", "\r\n"),
        TEMPLATE.replace("\n", "\r"),
        TEMPLATE.replace("ticket.\n", "ticket.   \t\n"),
        TEMPLATE + "\n\n",
        "\n" + TEMPLATE,
        TEMPLATE + "   ",
    ],
    ids=[
        "crlf",
        "cr",
        "trailing whitespace",
        "trailing blank lines",
        "leading blank line",
        "trailing spaces",
    ],
)
def test_cosmetic_edits_keep_the_id(cosmetic: str) -> None:
    original = prompt_version(TEMPLATE, name="triage", version="3")
    edited = prompt_version(cosmetic, name="triage", version="3")
    assert edited.id == original.id
    assert edited.sha256 == original.sha256


@pytest.mark.parametrize(
    "changed",
    [
        TEMPLATE.replace("Classify", "classify"),
        TEMPLATE.replace("JSON.", "JSON!"),
        TEMPLATE.replace("  Ticket", "Ticket"),  # indentation is content
        TEMPLATE.replace("\nAnswer", "\n\nAnswer"),  # so is an inner blank line
        TEMPLATE.replace("{{ ticket }}", "{{ticket}}"),
        TEMPLATE.replace("this ticket", "this  ticket"),  # an inner space, not trailing
    ],
    ids=["case", "punctuation", "indentation", "inner blank line", "placeholder spacing", "inner space"],
)
def test_any_content_change_changes_the_id(changed: str) -> None:
    assert (
        prompt_version(changed, name="triage", version="3").id
        != prompt_version(TEMPLATE, name="triage", version="3").id
    )


def test_id_formats() -> None:
    named = prompt_version(TEMPLATE, name="triage", version="3")
    unversioned = prompt_version(TEMPLATE, name="triage")
    anonymous = prompt_version(TEMPLATE)
    digest = anonymous.sha256
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert named.id == f"triage@3#{digest[:12]}"
    assert unversioned.id == f"triage#{digest[:12]}"
    assert anonymous.id == f"sha256:{digest[:12]}"
    assert str(named) == named.id
    assert named.short_hash == digest[:12]
    # The name and version label the hash; they are not part of it.
    assert named.sha256 == unversioned.sha256 == digest


def test_the_template_is_hashed_not_a_rendering() -> None:
    template = "Hello {name}"
    assert prompt_version(template).id != prompt_version(template.format(name="Ada")).id
    assert prompt_version(template).id == prompt_version("Hello {name}\n").id


def test_system_prompt_is_part_of_the_identity() -> None:
    without = prompt_version(TEMPLATE, name="t")
    with_system = prompt_version(TEMPLATE, name="t", system_prompt="You triage tickets.")
    other_system = prompt_version(TEMPLATE, name="t", system_prompt="You triage tickets!")
    empty_system = prompt_version(TEMPLATE, name="t", system_prompt="")
    ids = {without.id, with_system.id, other_system.id, empty_system.id}
    assert len(ids) == 4
    assert prompt_version(TEMPLATE, name="t", system_prompt="You triage tickets.\r\n").id == with_system.id


def test_system_and_template_cannot_be_confused() -> None:
    # Moving text between the system prompt and the template is a different prompt.
    a = prompt_version("B", system_prompt="A")
    b = prompt_version("A", system_prompt="B")
    c = prompt_version("A\nB")
    assert len({a.id, b.id, c.id}) == 3


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"version": "1"}, "needs a name"),
        ({"name": "a@b"}, "must not contain '@' or '#'"),
        ({"name": "a#b"}, "must not contain '@' or '#'"),
        ({"name": " "}, "must be non-empty"),
        ({"name": "a", "version": "1#2"}, "must not contain '#'"),
    ],
)
def test_invalid_names_and_versions(kwargs: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        prompt_version(TEMPLATE, **kwargs)


def test_normalise_prompt() -> None:
    assert normalise_prompt("\r\n  a  \r\n\r\n b\t\r\n\n") == "  a\n\n b"
    assert normalise_prompt("   \n\n") == ""
