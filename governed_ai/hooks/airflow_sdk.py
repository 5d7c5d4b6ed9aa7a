"""Airflow objects used on every governed call, looked up once.

``airflow.providers.common.compat.sdk`` resolves its names lazily through a module ``__getattr__`` that
costs microseconds per access; metrics and Airflow's secrets masker are asked for several times per model
call, so the hot path takes them from here.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any


@functools.cache
def airflow_sdk(name: str) -> Any:
    """``airflow.providers.common.compat.sdk.<name>`` (e.g. ``Stats``, ``redact``), resolved once."""
    return getattr(importlib.import_module("airflow.providers.common.compat.sdk"), name)
