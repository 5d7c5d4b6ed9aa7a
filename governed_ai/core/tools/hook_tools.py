"""Whitelisted methods of Airflow hooks as tools.

A hook method becomes a tool only by naming the hook class and the method in code, together with an
argument model that states exactly which parameters a caller (a model) may set. The hook class is a Python
object the DAG author imported; nothing is resolved from strings found in connections or variables.
Airflow is not imported here: any class with the method will do.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from governed_ai.core.tools.tool import Tool, ToolDefinitionError


def hook_method_tool(
    hook_cls: type[Any],
    method_name: str,
    args_model: type[BaseModel],
    *,
    side_effects: bool,
    name: str | None = None,
    description: str | None = None,
    hook_kwargs: Mapping[str, Any] | None = None,
    idempotent: bool = False,
    result: Callable[[Any], Any] | None = None,
) -> Tool:
    """A tool that calls ``hook_cls(**hook_kwargs).<method_name>(**validated arguments)``.

    :param hook_cls: The hook class (e.g. ``HttpHook``); instantiated per call, inside the task.
    :param method_name: A public method of the hook; private (``_``-prefixed) methods are refused.
    :param args_model: Pydantic model of the arguments passed to the method as keywords. Only these
        parameters can be set by a caller; each must be a parameter of the method.
    :param side_effects: Required, because only the author knows: does the method change anything?
    :param name: Tool name; default ``<hook class>_<method>`` in snake case.
    :param description: For the model; default the method's docstring's first paragraph.
    :param hook_kwargs: Fixed constructor arguments (e.g. the connection id), never set by a caller.
    :param idempotent: See :class:`Tool`.
    :param result: Optional conversion of the method's return value into something JSON-able.
    """
    if method_name.startswith("_"):
        raise ToolDefinitionError(f"{hook_cls.__name__}.{method_name} is private; only public methods")
    method = getattr(hook_cls, method_name, None)
    if not callable(method):
        raise ToolDefinitionError(f"{hook_cls.__name__} has no method {method_name!r}")
    if not (isinstance(args_model, type) and issubclass(args_model, BaseModel)):
        raise ToolDefinitionError(
            f"args_model for {hook_cls.__name__}.{method_name} must be a pydantic model"
        )
    _check_parameters(hook_cls, method_name, method, args_model)
    fixed = dict(hook_kwargs or {})
    convert = result or (lambda value: value)

    def invoke(arguments: BaseModel) -> Any:
        hook = hook_cls(**fixed)
        values = {key: getattr(arguments, key) for key in type(arguments).model_fields}
        return convert(getattr(hook, method_name)(**values))

    doc = inspect.cleandoc(inspect.getdoc(method) or "").split("\n\n", 1)[0].replace("\n", " ")
    return Tool(
        name=name or f"{_snake(hook_cls.__name__)}_{method_name}",
        description=description if description is not None else doc,
        args_model=args_model,
        invoke=invoke,
        side_effects=side_effects,
        idempotent=idempotent,
        origin=f"hook {hook_cls.__module__}.{hook_cls.__qualname__}.{method_name}",
    )


def _check_parameters(
    hook_cls: type[Any], method_name: str, method: Callable[..., Any], args_model: type[BaseModel]
) -> None:
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):  # builtins without a signature: nothing to check against
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(args_model.model_fields) - set(parameters))
    if unknown:
        raise ToolDefinitionError(
            f"args_model fields {unknown} are not parameters of {hook_cls.__name__}.{method_name}"
            f"{inspect.signature(method)}"
        )


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))
