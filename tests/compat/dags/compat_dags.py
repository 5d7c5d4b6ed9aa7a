"""The compatibility suite's DAGs: every operator of the provider, run by ``dag.test()`` on each line.

The model is the FakeOpenAIServer of ``tests/fakes`` (a named fake: scripted replies over real HTTP); Chroma
runs embedded with the provider's offline embeddings, so the wheel's own tokenizer and the ``chroma`` extra
are exercised. The test reads what the operators returned from the run's XComs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pendulum
from airflow.providers.common.compat.sdk import dag
from pydantic import BaseModel, Field

from governed_ai.core.tools import ToolRegistry, tool
from governed_ai.core.validation import ValidationSuite, label_in_set, not_empty
from governed_ai.operators.agent import AgentOperator
from governed_ai.operators.batch import LLMBatchOperator
from governed_ai.operators.chroma import ChromaIngestOperator, ChromaPurgeOperator, ChromaQueryOperator
from governed_ai.operators.llm import LLMOperator
from governed_ai.operators.quality import LLMOutputQualityOperator
from governed_ai.operators.tool import ToolOperator
from governed_ai.sensors.chroma import ChromaCollectionSensor

KB_DIR = Path(__file__).resolve().parent.parent / "data" / "kb"
START = pendulum.datetime(2026, 1, 1, tz="UTC")
COMMON: dict[str, Any] = {"schedule": None, "start_date": START, "catchup": False, "tags": ["compat"]}


class Label(BaseModel):
    label: Literal["negative", "positive"]
    summary: str = Field(min_length=1)


class OrderId(BaseModel):
    order_id: str = Field(pattern=r"^[A-Z]{2}[0-9]{6}$")


class Words(BaseModel):
    text: str = Field(max_length=40)


TOOLS = ToolRegistry()


@tool(registry=TOOLS, description="Status of one order by its id.")
def lookup_order(args: OrderId) -> dict[str, str]:
    return {"order_id": args.order_id, "status": "shipped"}


@tool(registry=TOOLS, description="Upper-cases a few words.")
def shout(args: Words) -> str:
    return args.text.upper()


@dag(dag_id="compat_llm", **COMMON)
def compat_llm() -> None:
    LLMOperator(
        task_id="single",
        system_prompt="Classify the ticket.",
        prompt="Ticket: {{ params.ticket }}",
        params={"ticket": "Great service, thank you"},
        output_schema=Label,
        max_tokens=64,
    )
    LLMBatchOperator(
        task_id="batch",
        items=[{"id": f"T{i}", "text": f"ticket number {i}"} for i in range(5)],
        key_field="id",
        prompt_template="Ticket: {{ item.text }}",
        output_schema=Label,
        max_tokens=64,
        concurrency=2,
    )
    LLMOutputQualityOperator(
        task_id="gate",
        suite=ValidationSuite(
            name="compat_gate", checks=[label_in_set("label", ["positive"]), not_empty("summary")]
        ),
        rows=[
            {"label": "positive", "summary": "fine"},
            {"label": "negative", "summary": "broken"},
            {"label": "positive", "summary": ""},
        ],
        outcome="quarantine",
    )


compat_llm()


@dag(dag_id="compat_tools", **COMMON)
def compat_tools() -> None:
    direct = ToolOperator(task_id="direct", tool="shout", registry=TOOLS, arguments={"text": "hello"})
    agent = AgentOperator(
        task_id="agent",
        tools=["lookup_order", "shout"],
        registry=TOOLS,
        system_prompt="Use a tool, then answer.",
        prompt="Where is order AB123456?",
        max_steps=2,
        max_tokens=64,
    )
    direct >> agent


compat_tools()


@dag(dag_id="compat_chroma", **COMMON)
def compat_chroma() -> None:
    ingest = ChromaIngestOperator(task_id="ingest", collection="compat_kb", paths=[str(KB_DIR)])
    wait = ChromaCollectionSensor(
        task_id="wait", collection="compat_kb", min_count=1, mode="poke", poke_interval=1, timeout=30
    )
    query = ChromaQueryOperator(task_id="query", collection="compat_kb", query="when do orders ship?")
    purge = ChromaPurgeOperator(task_id="purge", collection="compat_kb", sources=["guides/shipping.md"])
    ingest >> wait >> query >> purge


compat_chroma()


@dag(dag_id="compat_chroma_rerun", **COMMON)
def compat_chroma_rerun() -> None:
    """The nightly rerun of compat_chroma's ingest: only what was purged is new."""
    ChromaIngestOperator(task_id="ingest", collection="compat_kb", paths=[str(KB_DIR)])


compat_chroma_rerun()
