"""Optional features, the extras that install them, and the error raised when one is missing.

Every import of an optional dependency goes through :func:`requires_extra`, so a missing one says which
extra to install instead of surfacing as a bare ``ModuleNotFoundError``. The error is a
:class:`MissingExtra` (an ``ImportError``) and, whenever Airflow is importable, also Airflow's
``AirflowOptionalProviderFeatureException``: the ProvidersManager then reports the feature as switched off
rather than the provider as broken, and a DAG's import error names the fix. The core stays usable without
Airflow: the Airflow class is looked up only when the first such error is raised.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

DISTRIBUTION = "airflow-provider-governed-ai"

#: extra -> what it enables (the names in pyproject.toml's [project.optional-dependencies]).
EXTRAS: dict[str, str] = {
    "chroma": "Chroma retrieval with offline embeddings (ChromaHook, the Chroma operators and sensor)",
    "validation": "quality gates with Great Expectations (LLMOutputQualityOperator)",
    "postgres": "a governance store on PostgreSQL",
    "openlineage": "OpenLineage facets for the AI operators",
    "local-model": "the bundled local model server (governed-ai-local-model)",
    "common-ai": "governed pydantic-ai models and the governed connection type for the common-ai operators",
}


class MissingExtra(ImportError):
    """An optional feature's dependencies are not installed. Inside Airflow the raised exception is also an
    ``AirflowOptionalProviderFeatureException`` (see :func:`missing_extra`)."""


@functools.cache
def _missing_extra_class() -> type[MissingExtra]:
    try:
        from airflow.providers.common.compat.sdk import AirflowOptionalProviderFeatureException
    except ImportError:  # the core used without Airflow
        return MissingExtra

    class MissingProviderExtra(MissingExtra, AirflowOptionalProviderFeatureException):
        """Both an ``ImportError`` and Airflow's optional-feature exception."""

    return MissingProviderExtra


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing_extra_message(extra: str, detail: str) -> str:
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    return (
        f"{EXTRAS[extra]} needs the '{extra}' extra of {DISTRIBUTION}, which is not (fully) installed: "
        f"{detail}. Install it with: {install_hint(extra)}"
    )


def missing_extra(extra: str, detail: str) -> MissingExtra:
    """The exception for a missing extra; inside Airflow, also Airflow's optional-feature exception."""
    return _missing_extra_class()(missing_extra_message(extra, detail))


@contextmanager
def requires_extra(extra: str) -> Iterator[None]:
    """Wrap the imports of an optional dependency: an ``ImportError`` inside becomes :func:`missing_extra`."""
    try:
        yield
    except MissingExtra:
        raise
    except ImportError as error:
        raise missing_extra(extra, str(error)) from error
