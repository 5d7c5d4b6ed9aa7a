"""Reading a connection's extra fields the way both Airflow UIs may have stored them."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Connection


def extra_fields(conn: Connection, conn_type: str) -> dict[str, Any]:
    """The connection's extras keyed by field name.

    Forms built from ``conn-fields`` store plain names; older forms stored ``extra__<conn_type>__<name>``.
    Both are accepted so a connection keeps working whichever UI created it.
    """
    prefix = f"extra__{conn_type}__"
    return {key.removeprefix(prefix): value for key, value in conn.extra_dejson.items()}
