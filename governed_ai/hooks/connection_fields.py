"""Reading a connection's extra fields the way both Airflow UIs may have stored them."""

from __future__ import annotations

from typing import Any

from airflow.providers.common.compat.sdk import Connection

from governed_ai.hooks.connection_forms import decode_json_fields


def extra_fields(conn: Connection, conn_type: str) -> dict[str, Any]:
    """The connection's extras keyed by field name.

    Forms built from ``conn-fields`` store plain names; older forms stored ``extra__<conn_type>__<name>``.
    Both are accepted so a connection keeps working whichever UI created it; JSON-typed fields that an
    Airflow 3.1 form stored as text are parsed.
    """
    prefix = f"extra__{conn_type}__"
    return decode_json_fields(
        conn_type, {key.removeprefix(prefix): value for key, value in conn.extra_dejson.items()}
    )
