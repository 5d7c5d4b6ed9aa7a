"""Connection forms on Airflow 3.1, built from the same declaration Airflow 3.2+ reads.

Airflow 3.2+ draws a connection form from the ``conn-fields`` and ``ui-field-behaviour`` entries of
:func:`governed_ai.get_provider_info.get_provider_info` (and then ignores the hook's methods). Airflow 3.1
knows only the hook's ``get_connection_form_widgets`` and ``get_ui_field_behaviour``, and only when they
are defined on the hook class itself (``"get_connection_form_widgets" in hook_class.__dict__``). So each
hook declares them on 3.1 only, as the functions below, which derive both from the provider info: one
declaration, two readers, no drift.

On 3.1 the API server calls ``get_connection_form_widgets`` with WTForms and Flask-AppBuilder replaced by
stand-ins that turn each field into a JSON-schema parameter for the React form; in other processes the
import fails and Airflow skips the widgets, which nothing there needs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from governed_ai.get_provider_info import get_provider_info


def connection_type_info(conn_type: str) -> dict[str, Any]:
    """The provider info's entry for ``conn_type`` (raises ``KeyError`` for a type this provider lacks)."""
    for entry in get_provider_info()["connection-types"]:
        if entry["connection-type"] == conn_type:
            return dict(entry)
    raise KeyError(f"connection type {conn_type!r} is not declared in get_provider_info()")


def _schema_types(schema: Mapping[str, Any]) -> set[str]:
    declared = schema.get("type", "string")
    return {declared} if isinstance(declared, str) else set(declared)


def json_typed_fields(conn_type: str) -> frozenset[str]:
    """Extra fields declared as JSON objects or arrays: a 3.1 form stores them as JSON text."""
    fields = connection_type_info(conn_type).get("conn-fields", {})
    return frozenset(
        name for name, spec in fields.items() if _schema_types(spec.get("schema", {})) & {"object", "array"}
    )


def decode_json_fields(conn_type: str, extras: dict[str, Any]) -> dict[str, Any]:
    """``extras`` with the JSON-typed fields parsed when they arrive as text (an Airflow 3.1 form)."""
    decoded = dict(extras)
    for name in json_typed_fields(conn_type):
        value = decoded.get(name)
        if isinstance(value, str) and value.strip():
            # Text that is not JSON stays as it is: the settings model then names the field and the fix.
            with contextlib.suppress(json.JSONDecodeError):
                decoded[name] = json.loads(value)
    return decoded


def legacy_form_widgets(conn_type: str) -> Callable[[], dict[str, Any]]:
    """A ``get_connection_form_widgets`` for Airflow 3.1 from ``conn_type``'s ``conn-fields``.

    Airflow 3.1 accepts only string, integer, boolean and password fields: numbers are strings (the
    settings models parse them) and JSON objects are text areas (decoded by :func:`decode_json_fields`).
    """

    def get_connection_form_widgets() -> dict[str, Any]:
        # Imported when called: on 3.1 the API server substitutes these modules while it calls this.
        from flask_appbuilder.fieldwidgets import BS3TextAreaFieldWidget, BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import BooleanField, IntegerField, StringField
        from wtforms.validators import Optional, any_of

        widgets: dict[str, Any] = {}
        for name, spec in connection_type_info(conn_type).get("conn-fields", {}).items():
            schema = spec.get("schema", {})
            types = _schema_types(schema)
            validators: list[Any] = [Optional()]
            if "enum" in schema:
                validators.append(any_of(list(schema["enum"])))
            common = {
                "label": lazy_gettext(spec.get("label", name)),
                "description": spec.get("description", ""),
                "validators": validators,
                "default": schema.get("default"),
            }
            if "boolean" in types:
                widgets[name] = BooleanField(**common)
            elif "integer" in types:
                widgets[name] = IntegerField(widget=BS3TextFieldWidget(), **common)
            elif types & {"object", "array"}:
                default = common.pop("default")
                widgets[name] = StringField(
                    widget=BS3TextAreaFieldWidget(),
                    default=json.dumps(default) if default is not None else None,
                    **common,
                )
            else:  # string, number
                default = common.pop("default")
                widgets[name] = StringField(
                    widget=BS3TextFieldWidget(), default=None if default is None else str(default), **common
                )
        return widgets

    return get_connection_form_widgets


def legacy_field_behaviour(conn_type: str) -> Callable[[], dict[str, Any]]:
    """A ``get_ui_field_behaviour`` for Airflow 3.1 from ``conn_type``'s ``ui-field-behaviour``."""

    def get_ui_field_behaviour() -> dict[str, Any]:
        behaviour = connection_type_info(conn_type).get("ui-field-behaviour", {})
        return {
            "hidden_fields": list(behaviour.get("hidden-fields", [])),
            "relabeling": dict(behaviour.get("relabeling", {})),
            "placeholders": dict(behaviour.get("placeholders", {})),
        }

    return get_ui_field_behaviour
