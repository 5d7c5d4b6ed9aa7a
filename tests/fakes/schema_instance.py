"""A valid instance of a JSON schema, made up by a fake model server (the part of a model a fake needs).

Grammar-constrained servers always answer with JSON that matches the schema they were sent; a fake that
stands in for one must do the same, or every structured call would go through repairs. This covers what
pydantic emits for the provider's schemas: objects (required properties), ``$ref``/``$defs``, ``oneOf``/
``anyOf`` (an agent step's union: the ``final`` answer when it is offered, else the first tool), ``const``,
``enum``, strings with length bounds and simple ``pattern``s, numbers with bounds, booleans, arrays, null.
The strings say they are fake: ``text`` (e.g. the item key) is put into them, padded or cut to fit.
"""

from __future__ import annotations

import re
from typing import Any

_parser: Any
try:  # Python 3.11+
    import re._parser as _parser
except ImportError:  # pragma: no cover
    import sre_parse as _parser

_C = _parser  # the regex opcodes: LITERAL, IN, MAX_REPEAT, ...


class UnsupportedSchema(ValueError):
    """A schema this generator cannot satisfy (e.g. a pattern with look-arounds)."""


def instance_for(schema: dict[str, Any], text: str = "fake reply") -> Any:
    """A value that validates against ``schema``; strings are built from ``text``."""
    return _value(schema, schema.get("$defs") or schema.get("definitions") or {}, text)


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = str(node["$ref"]).rsplit("/", 1)[-1]
        if name not in defs:
            raise UnsupportedSchema(f"unresolvable $ref {node['$ref']!r}")
        node = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _value(node: dict[str, Any], defs: dict[str, Any], text: str) -> Any:
    node = _resolve(node, defs)
    if "const" in node:
        return node["const"]
    if node.get("enum"):
        return node["enum"][0]
    for union in ("oneOf", "anyOf"):
        if union in node:
            return _branch(node[union], defs, text)
    if "allOf" in node:
        merged: dict[str, Any] = {}
        for part in node["allOf"]:
            merged.update(_resolve(part, defs))
        return _value(merged, defs, text)
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in node):
        properties = node.get("properties") or {}
        return {name: _value(properties[name], defs, text) for name in node.get("required", [])}
    if kind == "array":
        return [_value(node.get("items") or {}, defs, text) for _ in range(int(node.get("minItems", 0)))]
    if kind == "string":
        return _string(node, text)
    if kind in ("integer", "number"):
        return _number(node, integer=kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text  # no type: anything goes


def _branch(branches: list[dict[str, Any]], defs: dict[str, Any], text: str) -> Any:
    resolved = [_resolve(b, defs) for b in branches]
    final = [b for b in resolved if (b.get("properties") or {}).get("tool", {}).get("const") == "final"]
    errors = []
    for candidate in final + resolved:
        try:
            return _value(candidate, defs, text)
        except UnsupportedSchema as error:
            errors.append(str(error))
    raise UnsupportedSchema("; ".join(errors) or "empty union")


def _string(node: dict[str, Any], text: str) -> str:
    if "pattern" in node:
        return _matching(node["pattern"])
    low, high = int(node.get("minLength", 0)), node.get("maxLength")
    value = text
    if len(value) < low:
        value = (value + " " + "x" * low)[:low]
    if high is not None:
        value = value[: int(high)]
    return value


def _number(node: dict[str, Any], *, integer: bool) -> int | float:
    low = node.get("minimum", node.get("exclusiveMinimum"))
    high = node.get("maximum", node.get("exclusiveMaximum"))
    value: float = 1 if low is None else low + (1 if "exclusiveMinimum" in node else 0)
    if high is not None and value > high:
        value = high if "exclusiveMaximum" not in node else (low + high) / 2 if low is not None else high - 1
    return int(value) if integer else float(value)


def _matching(pattern: str) -> str:
    """The shortest string (first alternatives, first characters of classes) that ``pattern`` matches."""
    value = _emit(_parser.parse(pattern))
    if not re.search(pattern, value):
        raise UnsupportedSchema(f"cannot make a string matching {pattern!r}")
    return value


def _emit(parsed: Any) -> str:
    out = []
    for op, arg in parsed:
        if op is _C.LITERAL:
            out.append(chr(arg))
        elif op is _C.IN:
            out.append(_first_of_class(arg))
        elif op in (_C.MAX_REPEAT, _C.MIN_REPEAT):
            low, _high, item = arg
            out.append(_emit(item) * low)
        elif op is _C.SUBPATTERN:
            out.append(_emit(arg[-1]))
        elif op is _C.BRANCH:
            out.append(_emit(arg[1][0]))
        elif op is _C.AT:
            continue  # anchors match nothing
        elif op is _C.ANY:
            out.append("x")
        else:
            raise UnsupportedSchema(f"regex construct {op} is not supported by the fake")
    return "".join(out)


def _first_of_class(items: Any) -> str:
    for op, arg in items:
        if op is _C.NEGATE:
            raise UnsupportedSchema("negated character classes are not supported by the fake")
        if op is _C.LITERAL:
            return chr(arg)
        if op is _C.RANGE:
            return chr(arg[0])
        if op is _C.CATEGORY:
            return {"CATEGORY_DIGIT": "0", "CATEGORY_SPACE": " "}.get(str(arg), "a")
    raise UnsupportedSchema("empty character class")
