"""Batch LLM work (Airflow-free): items, the prompt template and the runner that schedules them."""

from governed_ai.core.batch.inputs import BatchInputError, BatchItem, make_items, parse_rows
from governed_ai.core.batch.prompt import BatchPrompt, PromptRenderError
from governed_ai.core.batch.runner import (
    BatchProgress,
    BatchRun,
    BatchRunner,
    BatchSettings,
    CallSettings,
    ItemOutcome,
)

__all__ = [
    "BatchInputError",
    "BatchItem",
    "BatchProgress",
    "BatchPrompt",
    "BatchRun",
    "BatchRunner",
    "BatchSettings",
    "CallSettings",
    "ItemOutcome",
    "PromptRenderError",
    "make_items",
    "parse_rows",
]
