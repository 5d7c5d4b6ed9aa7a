"""BatchPrompt: sandboxed Jinja with ``item`` in scope, one prompt version per template, clear failures."""

from __future__ import annotations

import pytest

from governed_ai.core.batch import BatchPrompt, PromptRenderError
from governed_ai.core.prompt_version import prompt_version


def test_renders_user_and_system_messages_from_the_item():
    prompt = BatchPrompt("Classify: {{ item.text }}", "You label {{ item.lang }} tickets.")
    assert prompt.messages({"text": "refund please", "lang": "en"}) == [
        {"role": "system", "content": "You label en tickets."},
        {"role": "user", "content": "Classify: refund please"},
    ]


def test_a_plain_string_item_is_usable_as_item():
    assert BatchPrompt("Say: {{ item }}").messages("hi") == [{"role": "user", "content": "Say: hi"}]


def test_the_version_is_the_template_hash_not_the_data():
    prompt = BatchPrompt("Classify: {{ item.text }}", "sys")
    expected = prompt_version("Classify: {{ item.text }}", system_prompt="sys").id
    assert prompt.version_id == expected
    assert BatchPrompt("Classify: {{ item.text }}", "other sys").version_id != expected
    named = BatchPrompt("Classify: {{ item.text }}", name="classify", version="3")
    assert named.version_id.startswith("classify@3#")
    assert prompt.description == f"prompt version {expected}"


def test_globals_are_in_scope_and_keep_the_version():
    prompt = BatchPrompt("{{ params.prefix }} {{ item.text }}")
    with_params = prompt.with_globals(params={"prefix": "Label:"})
    assert with_params.messages({"text": "x"}) == [{"role": "user", "content": "Label: x"}]
    assert with_params.version_id == prompt.version_id
    with pytest.raises(PromptRenderError, match="'params' is undefined"):
        prompt.messages({"text": "x"})  # the original is unchanged


def test_a_missing_field_fails_the_item_not_silently():
    prompt = BatchPrompt("Classify: {{ item.text }}")
    with pytest.raises(PromptRenderError, match="prompt template failed for this item.*'text'"):
        prompt.messages({"body": "wrong field"})


def test_a_template_that_renders_empty_fails_the_item():
    prompt = BatchPrompt("{% if item.text %}{{ item.text }}{% endif %}")
    with pytest.raises(PromptRenderError, match="rendered to an empty message"):
        prompt.messages({"text": ""})


def test_the_sandbox_refuses_attribute_tricks():
    prompt = BatchPrompt("{{ item.__class__.__mro__ }}")
    with pytest.raises(PromptRenderError):
        prompt.messages({"text": "x"})
    mutating = BatchPrompt("{{ item.update({'text': 'changed'}) }}")
    item = {"text": "original"}
    with pytest.raises(PromptRenderError, match="unsafe|not safely callable"):
        mutating.messages(item)
    assert item == {"text": "original"}


@pytest.mark.parametrize("template", ["", "   \n"])
def test_an_empty_template_is_refused_at_construction(template):
    with pytest.raises(ValueError, match="prompt_template must not be empty"):
        BatchPrompt(template)


def test_a_template_that_does_not_parse_is_refused_at_construction():
    with pytest.raises(ValueError, match="prompt template does not parse"):
        BatchPrompt("Classify: {{ item.text ")
    with pytest.raises(ValueError, match="prompt template does not parse"):
        BatchPrompt("ok {{ item }}", "{% if %}")
