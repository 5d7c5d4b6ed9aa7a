"""Cost of governing a tool call: direct call vs governed read-only, journaled side-effecting and replayed.

A governed call validates the arguments, asks the policy (name and argument constraints), redacts the
result and appends two audit records (authorize + call); a side-effecting call also claims and completes a
replay-journal entry; a replay reads the journal instead of running the tool. The tool itself is trivial,
so the figures are the governance overhead. Printed per mode: calls/s, mean ms per call, and the ratio to
the "audit floor" measured in the same run (two audit appends, the least a governed call must write).
SQLite (WAL) always; a throwaway local PostgreSQL when its binaries are installed.

    .venv/bin/python benchmarks/bench_tool_calls.py [--calls 500] [--no-postgres]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

from governed_ai.core.audit import AuditRecord, AuditStore
from governed_ai.core.governor import Governor
from governed_ai.core.journal import ReplayJournal
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.policy import PolicyProvider
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.core.tools import GovernedToolRunner, constrained_step_model, tool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.pg_server import PostgresUnavailable, start_postgres

POLICY = """
version: 1
rules:
  - name: bench
    match: {dag_id: bench_dag}
    tools:
      - name: lookup_order
        allow_other_args: false
        args: {order_id: {regex: "[A-Z]{2}[0-9]{6}", required: true}}
      - name: record_note
"""


class OrderId(BaseModel):
    order_id: str = Field(pattern=r"^[A-Z]{2}[0-9]{6}$")


class Note(BaseModel):
    order_id: str
    text: str


@tool(register=False, description="Status of an order.")
def lookup_order(args: OrderId) -> dict[str, str]:
    return {"order_id": args.order_id, "status": "shipped", "carrier": "DHL"}


@tool(register=False, description="Attach a note to an order.", side_effects=True)
def record_note(args: Note) -> dict[str, str]:
    return {"order_id": args.order_id, "note_id": "N-1"}


def timed(label: str, calls: int, run: Callable[[int], object], floor_ms: float | None = None) -> float:
    started = time.perf_counter()
    for i in range(calls):
        run(i)
    elapsed = time.perf_counter() - started
    per_call_ms = elapsed / calls * 1000
    ratio = "" if floor_ms is None else f"  ({per_call_ms / floor_ms:5.2f}x the audit floor)"
    print(f"  {label:<36} {calls / elapsed:>10,.0f} calls/s  {per_call_ms:8.3f} ms/call{ratio}")
    return per_call_ms


def run_backend(name: str, url: str, calls: int) -> None:
    engine = create_store_engine(url)
    audit = AuditStore(engine)
    governor = Governor(policy=PolicyProvider(text=POLICY), ledger=BudgetLedger(engine), audit=audit)
    journal = ReplayJournal(engine, "tool")
    subject = Subject(dag_id="bench_dag", task_id="agent", run_id="manual__bench")
    runner = GovernedToolRunner(governor, subject, [lookup_order, record_note], journal)
    note = {"order_id": "AB123456", "text": "called back"}
    print(f"{name}:")

    timed(
        "direct call (validate + run)",
        calls,
        lambda i: lookup_order.run(lookup_order.validate({"order_id": "AB123456"})),
    )
    # What every governed call must pay at least: its two audit records, each in its own transaction.
    record = AuditRecord.for_subject(
        subject, action="tool.call", resource="lookup_order", extra={"step": "0"}
    )
    floor = timed(
        "audit floor: 2 appends, no tool", calls, lambda i: (audit.append(record), audit.append(record))
    )
    timed(
        "governed read-only",
        calls,
        lambda i: runner.call("lookup_order", {"order_id": "AB123456"}, step=str(i)),
        floor,
    )
    timed(
        "governed side effect (journaled)",
        calls,
        lambda i: runner.call("record_note", note, step=str(i)),
        floor,
    )
    retry = GovernedToolRunner(governor, subject.model_copy(update={"try_number": 2}), [record_note], journal)
    timed(
        "replayed from the journal (retry)",
        calls,
        lambda i: retry.call("record_note", note, step=str(i)),
        floor,
    )
    print(f"  audit chain after the run: ok={audit.verify().ok}")
    engine.dispose()


def bench_schema(steps: int) -> None:
    """Building the constrained step schema: first time vs the cached model an agent reuses every step."""
    tools = [lookup_order, record_note]
    started = time.perf_counter()
    constrained_step_model(
        tools, allow_final=True, answer_schema=None, answer_max_chars=7
    ).model_json_schema()
    cold = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    for _ in range(steps):
        constrained_step_model(
            tools, allow_final=True, answer_schema=None, answer_max_chars=7
        ).model_json_schema()
    warm = (time.perf_counter() - started) / steps * 1000
    print(
        f"constrained step schema (2 tools + final): first build {cold:.3f} ms, later steps {warm:.3f} ms "
        f"({cold / warm:.1f}x faster from the cache)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=500, help="calls per mode")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-tools-") as directory:
        run_backend("SQLite (WAL, synchronous=NORMAL)", f"sqlite:///{directory}/gov.db", args.calls)
    bench_schema(200)

    if args.no_postgres:
        return
    try:
        server = start_postgres()
    except PostgresUnavailable as error:
        print(f"PostgreSQL: skipped ({error})")
        return
    try:
        run_backend("PostgreSQL 127.0.0.1", server.create_database("bench_tools"), args.calls)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
