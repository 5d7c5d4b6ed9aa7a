"""A tool: a typed Python callable a governed task (or an agent's model) may call by name.

The arguments are described by a pydantic model, so the same definition gives the JSON schema offered to a
model, validation with readable errors, and the values the policy's argument constraints are checked
against. A tool declares whether it has side effects: side-effecting calls are journaled so that an Airflow
retry replays them instead of doing them twice.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from governed_ai.core.errors import ConfigurationError, InvalidInput
from governed_ai.core.structured_output import describe_failure

if TYPE_CHECKING:
    from governed_ai.core.tools.registry import ToolRegistry

#: The choice an agent's model makes to stop calling tools and answer; no tool may take this name.
FINAL_CHOICE = "final"

# What OpenAI accepts as a function name; other servers accept at least this.
_TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class ToolDefinitionError(ConfigurationError, TypeError):
    """A tool is declared wrongly (bad name, untyped parameter, ...); raised when the DAG file is parsed."""


class ToolArgumentsError(InvalidInput):
    """Arguments do not fit a tool's argument model; ``problems`` lists each one in readable form."""

    def __init__(self, tool: str, problems: str) -> None:
        super().__init__(f"invalid arguments for tool {tool!r}:\n{problems}")
        self.tool = tool
        self.problems = problems


@dataclass(frozen=True)
class Tool:
    """A named callable with a pydantic argument model.

    Build one with :func:`tool` (from a function) or
    :func:`~governed_ai.core.tools.hook_tools.hook_method_tool` (from a whitelisted Airflow hook method).

    :param name: What the model and the policy call it (``[A-Za-z_][A-Za-z0-9_-]{0,63}``, not ``final``).
    :param description: One or two sentences telling the model what the tool does and when to use it.
    :param args_model: Pydantic model of the arguments; its JSON schema is what the model is shown.
    :param invoke: Called with a validated ``args_model`` instance; returns a JSON-able result.
    :param side_effects: True if a call changes something outside (writes, sends, pays). Such calls are
        journaled and replayed on retry instead of being repeated.
    :param idempotent: True if repeating a call with the same arguments is harmless. Only then is a call
        whose earlier attempt started but never finished (a crash mid-call) executed again; otherwise it is
        reported as in doubt for a human to resolve.
    :param origin: Where the definition lives (file and qualified name); re-importing the same definition
        under another module name may re-register it, a different definition with the same name may not.
    """

    name: str
    description: str
    args_model: type[BaseModel]
    invoke: Callable[[BaseModel], Any] = field(repr=False, compare=False)
    side_effects: bool = False
    idempotent: bool = False
    origin: str = ""

    def __post_init__(self) -> None:
        if not _TOOL_NAME.fullmatch(self.name):
            raise ToolDefinitionError(
                f"tool name {self.name!r} is invalid: use 1-64 letters, digits, '_' or '-', starting with a "
                "letter or '_' (the OpenAI function-name rule)"
            )
        if self.name == FINAL_CHOICE:
            raise ToolDefinitionError(
                f"tool name {FINAL_CHOICE!r} is reserved: an agent's model chooses it to give its answer"
            )
        if not self.description.strip():
            raise ToolDefinitionError(
                f"tool {self.name!r} needs a description: the model decides from it when to use the tool"
            )
        if not (isinstance(self.args_model, type) and issubclass(self.args_model, BaseModel)):
            raise ToolDefinitionError(f"tool {self.name!r}: args_model must be a pydantic model class")

    def json_schema(self) -> dict[str, Any]:
        """JSON schema of the arguments, as offered to a model."""
        return self.args_model.model_json_schema()

    def openai_spec(self) -> dict[str, Any]:
        """The entry for OpenAI's ``tools=`` parameter."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.json_schema(),
            },
        }

    def validate(self, arguments: object) -> BaseModel:
        """Validate raw arguments (a JSON object as a mapping); raise :class:`ToolArgumentsError` if wrong.

        Arguments the model does not declare are an error, not silently dropped: the caller (often a model)
        learns that it used a wrong name.
        """
        if not isinstance(arguments, Mapping):
            raise ToolArgumentsError(
                self.name, f"- (whole object): expected a JSON object of arguments, got {_kind(arguments)}"
            )
        known = set(self.args_model.model_fields)
        unknown = sorted(str(key) for key in arguments if key not in known)
        if unknown:
            raise ToolArgumentsError(
                self.name,
                "\n".join(f"- {key}: unknown argument; known: {sorted(known)}" for key in unknown),
            )
        try:
            return self.args_model.model_validate(dict(arguments))
        except ValidationError as error:
            raise ToolArgumentsError(self.name, describe_failure(error)) from None

    def run(self, arguments: BaseModel) -> Any:
        """Call the tool with already validated arguments."""
        return self.invoke(arguments)

    def signature_summary(self) -> str:
        """``name(arg: type, ...)`` for prompts that list tools in text."""
        schema = self.json_schema()
        required = set(schema.get("required", ()))
        parts = []
        for arg, spec in schema.get("properties", {}).items():
            kind = spec.get("type") or "value"
            parts.append(f"{arg}: {kind}" + ("" if arg in required else " (optional)"))
        return f"{self.name}({', '.join(parts)})"


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def definition_origin(fn: Callable[..., Any]) -> str:
    """``file:qualname`` of a function: equal for the same definition imported twice under two names."""
    code = getattr(fn, "__code__", None)
    filename = code.co_filename if code is not None else getattr(fn, "__module__", "?")
    return f"{filename}:{getattr(fn, '__qualname__', repr(fn))}"


def tool_from_function(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    side_effects: bool = False,
    idempotent: bool = False,
) -> Tool:
    """Build a :class:`Tool` from a typed function.

    Two styles: one parameter annotated with a pydantic model (called with the validated model), or
    keyword parameters with type annotations (a model is derived from them; the function is called with
    keyword arguments). ``Annotated[str, Field(description=...)]`` describes a keyword parameter.
    """
    tool_name = name if name is not None else fn.__name__
    hints = _type_hints(fn, tool_name)
    parameters = list(inspect.signature(fn).parameters.values())
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD, parameter.POSITIONAL_ONLY):
            raise ToolDefinitionError(
                f"tool {tool_name!r}: parameter {parameter.name!r} must be a plain or keyword parameter "
                "(no *args, **kwargs or positional-only), so that it can be named in a JSON object"
            )
        if parameter.name not in hints:
            raise ToolDefinitionError(
                f"tool {tool_name!r}: parameter {parameter.name!r} has no type annotation; the argument "
                "schema is derived from annotations"
            )

    invoke: Callable[[BaseModel], Any]
    single = hints.get(parameters[0].name) if len(parameters) == 1 else None
    if isinstance(single, type) and issubclass(single, BaseModel):
        args_model: type[BaseModel] = single

        def invoke(arguments: BaseModel) -> Any:
            return fn(arguments)

    else:
        definitions: dict[str, Any] = {
            p.name: (hints[p.name], ... if p.default is inspect.Parameter.empty else p.default)
            for p in parameters
        }
        args_model = create_model(
            f"{_camel(tool_name)}Arguments",
            __config__=ConfigDict(extra="forbid"),
            **definitions,
        )
        names = [p.name for p in parameters]

        def invoke(arguments: BaseModel) -> Any:
            return fn(**{key: getattr(arguments, key) for key in names})

    return Tool(
        name=tool_name,
        description=description if description is not None else _first_paragraph(fn.__doc__),
        args_model=args_model,
        invoke=invoke,
        side_effects=side_effects,
        idempotent=idempotent,
        origin=definition_origin(fn),
    )


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    side_effects: bool = False,
    idempotent: bool = False,
    registry: ToolRegistry | None = None,
    register: bool = True,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    side_effects: bool = False,
    idempotent: bool = False,
    registry: ToolRegistry | None = None,
    register: bool = True,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Declare a function as a tool and register it (in ``registry``, by default the process registry).

    ::

        class LookupOrder(BaseModel):
            order_id: str = Field(pattern=r"^[A-Z]{2}[0-9]{6}$")

        @tool(description="Status and items of one order.")
        def lookup_order(args: LookupOrder) -> dict: ...

        @tool(side_effects=True)
        def issue_refund(order_id: str, amount_eur: float) -> dict:
            \"\"\"Refund part or all of an order.\"\"\"

    The decorated name is bound to the :class:`Tool` (call ``.run(validated_args)`` to use it directly).
    ``register=False`` only builds it.
    """

    def decorate(function: Callable[..., Any]) -> Tool:
        built = tool_from_function(
            function, name=name, description=description, side_effects=side_effects, idempotent=idempotent
        )
        if register:
            from governed_ai.core.tools.registry import default_registry

            (registry if registry is not None else default_registry).register(built)
        return built

    return decorate(fn) if fn is not None else decorate


def _type_hints(fn: Callable[..., Any], tool_name: str) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as error:  # a NameError from a string annotation, usually
        raise ToolDefinitionError(f"tool {tool_name!r}: cannot resolve type annotations: {error}") from error
    hints.pop("return", None)
    return hints


def _first_paragraph(doc: str | None) -> str:
    return inspect.cleandoc(doc or "").split("\n\n", 1)[0].replace("\n", " ").strip()


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[_-]", name) if part)
