"""Audit trail write throughput: single appends vs batches of 500 (append_many and AuditBuffer).

Prints records/s for each mode on SQLite (WAL, synchronous=NORMAL) and, when the PostgreSQL server
binaries are installed, on a throwaway local PostgreSQL cluster, together with the ratio to the goal of
5,000 records/s for batched writes.

    .venv/bin/python benchmarks/bench_audit_write.py [--records 20000] [--single 2000] [--no-postgres]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from governed_ai.core.audit import AuditBuffer, AuditRecord, AuditStore
from governed_ai.core.audit_anchors import AnchorLog
from governed_ai.core.keys import DeploymentKey, generate_key_text
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject

GOAL_RECORDS_PER_SECOND = 5_000
BATCH = 500

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.pg_server import PostgresUnavailable, start_postgres  # noqa: E402


def make_records(n: int) -> list[AuditRecord]:
    subject = Subject(dag_id="bench_dag", task_id="batch_classify", run_id="manual__bench")
    start = datetime(2026, 11, 25, tzinfo=UTC)
    return [
        AuditRecord.for_subject(
            subject,
            action="model.call",
            time=start + timedelta(milliseconds=i),
            resource="gpt-small",
            decision="allow",
            rule="batch-models",
            model="gpt-small",
            prompt_version="classify@2",
            prompt_tokens=180,
            completion_tokens=12,
            cost_usd=0.000_21,
            latency_ms=35.0,
            content=f"ticket {i}: customer asks about invoice [EMAIL] and delivery",
            extra={"row": i, "label": "billing"},
            map_index=i % 64,
        )
        for i in range(n)
    ]


def timed(label: str, records: list[AuditRecord], write: Callable[[list[AuditRecord]], None]) -> float:
    started = time.perf_counter()
    write(records)
    elapsed = time.perf_counter() - started
    rate = len(records) / elapsed
    print(
        f"  {label:<28} {len(records):>7,} records in {elapsed:7.3f} s = {rate:>10,.0f} records/s "
        f"({rate / GOAL_RECORDS_PER_SECOND:5.2f}x the {GOAL_RECORDS_PER_SECOND:,}/s goal)"
    )
    return rate


def run_backend(name: str, url: str, records: int, singles: int) -> None:
    engine = create_store_engine(url)
    # Keyed and anchored, as the governance hook builds it: the HMAC and the anchor writes are in the figures.
    store = AuditStore(
        engine,
        key=DeploymentKey.from_text(generate_key_text(), source="bench"),
        anchors=AnchorLog(tempfile.mkdtemp(prefix="bench-anchors-")),
    )
    print(f"{name}:")

    def single(batch: list[AuditRecord]) -> None:
        for record in batch:
            store.append(record)

    def many(batch: list[AuditRecord]) -> None:
        for offset in range(0, len(batch), BATCH):
            store.append_many(batch[offset : offset + BATCH])

    def buffered(batch: list[AuditRecord]) -> None:
        with AuditBuffer(store, max_records=BATCH, max_seconds=1.0) as buffer:
            for record in batch:
                buffer.add(record)

    timed("append (one per txn)", make_records(singles), single)
    timed(f"append_many (batches of {BATCH})", make_records(records), many)
    timed(f"AuditBuffer (max {BATCH})", make_records(records), buffered)
    started = time.perf_counter()
    verification = store.verify()
    elapsed = time.perf_counter() - started
    print(
        f"  verify: {verification.status}, {verification.records_checked:,} records in {elapsed:.3f} s "
        f"= {verification.records_checked / elapsed:,.0f} records/s"
    )
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000, help="records per batched run")
    parser.add_argument("--single", type=int, default=2_000, help="records for the one-per-transaction run")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    parser.add_argument(
        "--pg-fsync",
        choices=("on", "off"),
        default="on",
        help="PostgreSQL fsync (on = realistic commit cost)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-audit-") as directory:
        run_backend(
            "SQLite (WAL, synchronous=NORMAL)", f"sqlite:///{directory}/audit.db", args.records, args.single
        )

    if args.no_postgres:
        return
    try:
        server = start_postgres(fsync=args.pg_fsync == "on")
    except PostgresUnavailable as error:
        print(f"PostgreSQL: skipped ({error})")
        return
    try:
        url = server.create_database("bench_audit")
        run_backend(f"PostgreSQL 127.0.0.1 (fsync={args.pg_fsync})", url, args.records, args.single)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
