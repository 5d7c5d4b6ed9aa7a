"""Tools: declaring them (decorator, hook methods), their schemas and argument validation, registries."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import BaseModel, Field

from governed_ai.core.tools import (
    DuplicateToolError,
    Tool,
    ToolArgumentsError,
    ToolDefinitionError,
    ToolRegistry,
    UnknownToolError,
    default_registry,
    hook_method_tool,
    tool,
)


class OrderQuery(BaseModel):
    order_id: str = Field(pattern=r"^[A-Z]{2}[0-9]{6}$", description="order id such as AB123456")
    include_items: bool = False


def test_model_style_tool_calls_the_function_with_the_validated_model():
    seen: list[OrderQuery] = []

    @tool(register=False, description="Status of one order.")
    def lookup(args: OrderQuery) -> dict[str, str]:
        seen.append(args)
        return {"status": "shipped", "id": args.order_id}

    assert isinstance(lookup, Tool)
    assert lookup.args_model is OrderQuery
    assert lookup.side_effects is False
    assert lookup.run(lookup.validate({"order_id": "AB123456"})) == {"status": "shipped", "id": "AB123456"}
    assert seen == [OrderQuery(order_id="AB123456")]


def test_keyword_style_tool_derives_its_schema_from_annotations_and_docstring():
    @tool(register=False, side_effects=True)
    def refund(
        order_id: Annotated[str, Field(description="the order")], amount_eur: float, note: str = ""
    ) -> str:
        """Refund part of an order.

        Longer explanation that the model does not need.
        """
        return f"{order_id}:{amount_eur}:{note}"

    schema = refund.json_schema()
    assert schema["required"] == ["order_id", "amount_eur"]
    assert schema["properties"]["order_id"]["description"] == "the order"
    assert schema["properties"]["amount_eur"]["type"] == "number"
    assert refund.description == "Refund part of an order."
    assert refund.side_effects is True
    assert refund.run(refund.validate({"order_id": "AB1", "amount_eur": "2.5"})) == "AB1:2.5:"
    spec = refund.openai_spec()
    assert spec["type"] == "function"
    assert spec["function"]["name"] == "refund"
    assert spec["function"]["parameters"] == schema
    assert (
        refund.signature_summary() == "refund(order_id: string, amount_eur: number, note: string (optional))"
    )


def test_invalid_arguments_are_reported_per_field():
    @tool(register=False, description="d")
    def lookup(args: OrderQuery) -> None:
        return None

    with pytest.raises(ToolArgumentsError) as caught:
        lookup.validate({"order_id": "nope", "include_items": "maybe"})
    message = str(caught.value)
    assert "invalid arguments for tool 'lookup'" in message
    assert "- order_id: String should match pattern" in message
    assert "- include_items:" in message


def test_unknown_arguments_and_non_objects_are_errors_not_silently_dropped():
    @tool(register=False, description="d")
    def lookup(args: OrderQuery) -> None:
        return None

    with pytest.raises(
        ToolArgumentsError, match=r"- delete_all: unknown argument; known: \['include_items', "
    ):
        lookup.validate({"order_id": "AB123456", "delete_all": True})
    with pytest.raises(ToolArgumentsError, match="expected a JSON object of arguments, got str"):
        lookup.validate('{"order_id": "AB123456"}')


@pytest.mark.parametrize("name", ["final", "has space", "", "x" * 65, "9lives"])
def test_bad_tool_names_are_refused(name):
    with pytest.raises(ToolDefinitionError, match="reserved|invalid"):

        @tool(register=False, name=name, description="d")
        def anything(args: OrderQuery) -> None:
            return None


def test_untyped_parameters_and_varargs_are_refused_at_definition():
    with pytest.raises(ToolDefinitionError, match="'x' has no type annotation"):

        @tool(register=False, description="d")
        def untyped(x) -> None:  # type: ignore[no-untyped-def]
            return None

    with pytest.raises(ToolDefinitionError, match=r"no \*args, \*\*kwargs"):

        @tool(register=False, description="d")
        def variadic(**kwargs: str) -> None:
            return None


def test_a_description_is_required():
    with pytest.raises(ToolDefinitionError, match="needs a description"):

        @tool(register=False)
        def undocumented(order_id: str) -> None:
            return None


def test_registry_lookup_lists_known_names_when_missing():
    registry = ToolRegistry(name="orders")

    @tool(registry=registry, description="d")
    def lookup_order(args: OrderQuery) -> None:
        return None

    assert registry.get("lookup_order") is lookup_order
    assert registry.names() == ["lookup_order"]
    assert "lookup_order" in registry and len(registry) == 1
    with pytest.raises(UnknownToolError) as caught:
        registry.get("delete_records")
    assert str(caught.value).startswith(
        "no tool named 'delete_records' in registry 'orders' (registered: lookup_order)"
    )
    assert "lookup_order" not in default_registry  # registry= keeps it out of the process registry


def test_decorator_registers_in_the_process_registry_by_default():
    @tool(description="A tool that only this test defines.")
    def governed_ai_test_only_tool(order_id: str) -> str:
        return order_id

    assert default_registry.get("governed_ai_test_only_tool") is governed_ai_test_only_tool


def test_same_definition_may_register_again_but_another_definition_may_not():
    registry = ToolRegistry()

    def define() -> Tool:
        @tool(registry=registry, description="d")
        def lookup_order(args: OrderQuery) -> None:
            return None

        return lookup_order

    first = define()
    second = define()  # the same code again, as when a DAG-folder module is imported under two names
    assert registry.get("lookup_order") is second
    assert first.origin == second.origin

    with pytest.raises(DuplicateToolError, match="already registered"):

        @tool(registry=registry, name="lookup_order", description="d")
        def impostor(args: OrderQuery) -> None:
            return None


# -- hook methods ------------------------------------------------------------------------------------------


class RunCommand(BaseModel):
    command: list[str] = Field(min_length=1, max_length=4)


def _subprocess_result(result: object) -> dict[str, object]:
    return {"exit_code": getattr(result, "exit_code"), "output": getattr(result, "output")}  # noqa: B009


def test_hook_method_tool_calls_a_real_airflow_hook():
    from airflow.providers.standard.hooks.subprocess import SubprocessHook

    run = hook_method_tool(
        SubprocessHook, "run_command", RunCommand, side_effects=True, result=_subprocess_result
    )
    assert run.name == "subprocess_hook_run_command"
    assert run.side_effects is True
    assert run.origin.endswith("SubprocessHook.run_command")
    assert run.description == inspect.getdoc(SubprocessHook.run_command).split("\n\n")[0].replace("\n", " ")
    out = run.run(run.validate({"command": [sys.executable, "-c", "print(6 * 7)"]}))
    assert out == {"exit_code": 0, "output": "42"}
    # Only the whitelisted parameter exists for a caller: env and cwd cannot be set.
    with pytest.raises(ToolArgumentsError, match="cwd: unknown argument"):
        run.validate({"command": ["true"], "cwd": "/"})


def test_hook_method_tool_refuses_private_missing_and_mismatched_methods():
    from airflow.providers.standard.hooks.subprocess import SubprocessHook

    with pytest.raises(ToolDefinitionError, match="private"):
        hook_method_tool(SubprocessHook, "_private", RunCommand, side_effects=False)
    with pytest.raises(ToolDefinitionError, match="has no method 'drop_everything'"):
        hook_method_tool(SubprocessHook, "drop_everything", RunCommand, side_effects=False)

    class WrongArgs(BaseModel):
        shell: str

    with pytest.raises(
        ToolDefinitionError, match=r"\['shell'\] are not parameters of SubprocessHook.run_command"
    ):
        hook_method_tool(SubprocessHook, "run_command", WrongArgs, side_effects=True)


def test_tool_code_never_imports_by_name():
    """Tools come from code only: no ``import_string``/``importlib`` on strings a user could set."""
    import governed_ai.core.tools as package
    import governed_ai.operators.agent as agent_operator
    import governed_ai.operators.tool as tool_operator

    sources = [
        *Path(package.__file__).parent.glob("*.py"),
        Path(agent_operator.__file__),
        Path(tool_operator.__file__),
    ]
    assert len(sources) > 5
    for source in sources:
        text = source.read_text()
        assert "import_string" not in text, source
        assert "importlib" not in text, source
        assert "__import__" not in text, source
