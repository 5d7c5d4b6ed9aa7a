"""The batch prompt: one Jinja template for every item, rendered in a sandbox with ``item`` in scope.

The template is fixed for the whole batch, so the recorded prompt version is the template's hash and
not one per item; the data varies, the prompt does not.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from governed_ai.core.chat import Message, build_messages
from governed_ai.core.errors import InvalidInput
from governed_ai.core.prompt_version import prompt_version


class PromptRenderError(InvalidInput):
    """The template failed for an item (e.g. a missing field); the item fails, the batch goes on."""


class BatchPrompt:
    """``template`` (user message) and optional ``system_prompt``, both Jinja with ``item`` in scope."""

    def __init__(
        self,
        template: str,
        system_prompt: str | None = None,
        *,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        if not template or not template.strip():
            raise ValueError("prompt_template must not be empty")
        self.template = template
        self.system_prompt = system_prompt
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        try:
            self._user = env.from_string(template)
            self._system = env.from_string(system_prompt) if system_prompt else None
        except TemplateError as error:
            raise ValueError(f"prompt template does not parse: {error}") from None
        self.version_id = prompt_version(template, system_prompt=system_prompt, name=name, version=version).id
        self._globals: dict[str, Any] = {}

    def with_globals(self, **values: Any) -> BatchPrompt:
        """The same prompt with extra names in scope (e.g. the DAG's ``params``); same version id."""
        copy = object.__new__(BatchPrompt)
        copy.__dict__.update(self.__dict__)
        copy._globals = {**self._globals, **values}
        return copy

    def messages(self, item: Any) -> list[Message]:
        try:
            user = self._user.render(**self._globals, item=item)
            system = self._system.render(**self._globals, item=item) if self._system is not None else None
        except TemplateError as error:
            raise PromptRenderError(f"prompt template failed for this item: {error}") from None
        if not user.strip():
            raise PromptRenderError("prompt template rendered to an empty message for this item")
        return build_messages(user, system, None)

    @cached_property
    def description(self) -> str:
        return f"prompt version {self.version_id}"
