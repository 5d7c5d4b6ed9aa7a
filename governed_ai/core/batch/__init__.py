"""Batch LLM work (Airflow-free): items, the prompt template, retries, budget blocks, journal, runner."""

from governed_ai.core.batch.inputs import BatchInputError, BatchItem, make_items, parse_rows
from governed_ai.core.batch.item_journal import BatchJournal, JournalWriter, journal_prefix
from governed_ai.core.batch.prompt import BatchPrompt, PromptRenderError
from governed_ai.core.batch.runner import (
    BatchProgress,
    BatchRun,
    BatchRunner,
    BatchSettings,
    CallSettings,
    ItemOutcome,
    per_minute_limiter,
)

__all__ = [
    "BatchInputError",
    "BatchItem",
    "BatchJournal",
    "BatchProgress",
    "BatchPrompt",
    "BatchRun",
    "BatchRunner",
    "BatchSettings",
    "CallSettings",
    "ItemOutcome",
    "JournalWriter",
    "PromptRenderError",
    "journal_prefix",
    "make_items",
    "parse_rows",
    "per_minute_limiter",
]
