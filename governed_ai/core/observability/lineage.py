"""OpenLineage datasets and the run facet of an AI step. Needs ``openlineage-python``.

Import this module lazily, inside an operator's ``get_openlineage_facets_on_*`` methods: the client
comes with the OpenLineage provider, and without it those methods are never called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import attr
from openlineage.client.event_v2 import InputDataset, OutputDataset
from openlineage.client.facet_v2 import RunFacet

FACET_KEY = "governedAi"
SCHEMA_URL = (
    "https://raw.githubusercontent.com/governed-ai/airflow-provider-governed-ai/main/"
    "governed_ai/core/observability/GovernedAIRunFacet.json"
)


@attr.define
class GovernedAIRunFacet(RunFacet):
    """What the AI step did: model, prompt version, usage, cost, the policy decision, what it retrieved."""

    operation: str  # field names are camelCase, as in OpenLineage's own facets
    model: str | None = None
    promptVersion: str | None = None
    calls: int = 0
    promptTokens: int = 0
    completionTokens: int = 0
    costUsd: float = 0.0
    latencyMs: float | None = None
    policyRule: str | None = None
    policyDecision: str | None = None
    retrievedIds: list[str] = attr.field(factory=list)
    details: dict[str, Any] = attr.field(factory=dict)

    @staticmethod
    def _get_schema() -> str:
        return SCHEMA_URL


def model_input(base_url: str | None, model: str) -> InputDataset:
    """The model endpoint as an input dataset: namespace ``llm://host[:port]``, name the model."""
    parsed = urlparse(base_url or "https://api.openai.com/v1")
    return InputDataset(namespace=f"llm://{parsed.netloc or parsed.path}", name=model)


def collection_namespace(host: str | None, port: int, path: str | None) -> str:
    return f"chroma://{host}:{port}" if host else f"chroma+embedded://{path or 'default'}"


def collection_input(namespace: str, collection: str) -> InputDataset:
    return InputDataset(namespace=namespace, name=collection)


def collection_output(namespace: str, collection: str) -> OutputDataset:
    return OutputDataset(namespace=namespace, name=collection)


def _file_parts(location: str) -> tuple[str, str]:
    """``(namespace, name)`` of a URI, or of a local path (made absolute: lineage must not depend on cwd)."""
    parsed = urlparse(location)
    if parsed.scheme and parsed.scheme != "file":
        return f"{parsed.scheme}://{parsed.netloc}", parsed.path
    return "file", parsed.path if parsed.scheme == "file" else str(Path(location).resolve())


def file_input(location: str) -> InputDataset:
    namespace, name = _file_parts(location)
    return InputDataset(namespace=namespace, name=name)


def file_output(location: str) -> OutputDataset:
    namespace, name = _file_parts(location)
    return OutputDataset(namespace=namespace, name=name)
