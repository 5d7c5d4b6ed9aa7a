"""The group-commit writer and the journal's bulk steps, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError

from governed_ai.core.audit import AuditRecord
from governed_ai.core.journal import (
    JournalState,
    ReplayJournal,
    StepClaim,
    StepDone,
    StepFailed,
    journal_table,
)
from governed_ai.core.sqlstore import create_store_engine, ensure_tables, prepared_write
from governed_ai.core.store_writer import StoreWriter
from governed_ai.core.subject import Subject
from tests.audit_support import keyed_audit_store

SUBJECT = Subject(dag_id="batch_dag", task_id="classify", run_id="run-1", try_number=1)
INSTANCE = "i" * 64


def record(number: int) -> AuditRecord:
    return AuditRecord.for_subject(SUBJECT, action="model.call", resource="llm/m", extra={"n": number})


def claim(key: str, *, try_number: int = 1, reservation: str | None = "r1") -> StepClaim:
    return StepClaim("chat", key, INSTANCE, "chat m", try_number, reservation)


def done(key: str, result: object, *, tokens: tuple[int, int] = (3, 2)) -> StepDone:
    return StepDone("chat", key, INSTANCE, "chat m", 1, "r1", result, tokens[0], tokens[1], 0.25)


def test_concurrent_steps_are_committed_in_few_groups_with_their_audit_records(store_engine: Engine):
    audit = keyed_audit_store(store_engine)
    journal = ReplayJournal(store_engine, "chat")
    writer = StoreWriter(audit)

    async def step(number: int) -> None:
        key = f"k{number:04d}"
        await writer.write(steps=[claim(key)])
        await writer.write(records=[record(number)], steps=[done(key, {"n": number})])

    async def everything() -> None:
        await asyncio.gather(*(step(n) for n in range(400)))

    asyncio.run(everything())
    writer.close()

    entries = journal.entries_for_instance(INSTANCE)
    assert len(entries) == 400
    assert {e.state for e in entries.values()} == {JournalState.COMPLETED}
    assert entries["k0007"].result == {"n": 7}
    assert (entries["k0007"].prompt_tokens, entries["k0007"].completion_tokens) == (3, 2)
    assert entries["k0007"].cost_usd == 0.25 and entries["k0007"].reservation_id == "r1"
    assert len(audit.query(limit=None)) == 400
    assert audit.verify().ok
    # Grouping: far fewer transactions than the 800 writes that were awaited.
    assert writer.commits < 400


def test_a_failing_step_fails_its_whole_group_and_nothing_of_it_is_stored(store_engine: Engine):
    audit = keyed_audit_store(store_engine)
    writer = StoreWriter(audit)
    with pytest.raises(ValueError, match="must be JSON"):
        writer.write_sync(records=[record(1)], steps=[done("bad", {"x": float("nan")})])
    writer.close()
    assert audit.query() == []  # the audit record of the failed group was rolled back with it
    assert ReplayJournal(store_engine, "chat").entries_for_instance(INSTANCE) == {}


def test_a_claim_never_overwrites_a_completed_step_and_a_failure_is_recorded(store_engine: Engine):
    writer = StoreWriter(keyed_audit_store(store_engine))
    writer.write_sync(steps=[claim("a"), claim("b")])
    writer.write_sync(steps=[done("a", {"ok": True})])
    writer.write_sync(steps=[claim("a", try_number=2), StepFailed("chat", "b", "boom")])
    writer.close()
    entries = ReplayJournal(store_engine, "chat").entries_for_instance(INSTANCE)
    assert entries["a"].state is JournalState.COMPLETED and entries["a"].result == {"ok": True}
    assert entries["b"].state is JournalState.FAILED and entries["b"].error == "boom"


def test_a_started_step_claimed_again_by_a_later_try_counts_its_attempts(store_engine: Engine):
    writer = StoreWriter(keyed_audit_store(store_engine))
    writer.write_sync(steps=[claim("a", reservation="r1")])
    writer.write_sync(steps=[claim("a", try_number=2, reservation="r2")])
    writer.close()
    entry = ReplayJournal(store_engine, "chat").entries_for_instance(INSTANCE)["a"]
    assert entry.state is JournalState.STARTED
    assert (entry.attempts, entry.try_number, entry.reservation_id) == (2, 2, "r2")


def test_sync_writers_on_many_threads_all_land(store_engine: Engine):
    audit = keyed_audit_store(store_engine)
    writer = StoreWriter(audit)
    threads = [
        threading.Thread(
            target=lambda n=n: [writer.write_sync(records=[record(n * 10 + i)]) for i in range(10)]
        )
        for n in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    assert len(audit.query(limit=None)) == 80
    assert audit.verify().ok


def test_no_raw_key_is_stored_only_digests_and_a_label(store_engine: Engine):
    journal = ReplayJournal(store_engine, "tool")
    raw_key = '["dag","run","task",-1,"step","refund","customer@example.com"]'
    claimed = journal.begin(raw_key, label="tool refund")
    journal.complete(raw_key, {"done": True})
    with store_engine.connect() as connection:
        row = connection.execute(select(journal_table)).mappings().one()
    assert "customer@example.com" not in " ".join(str(value) for value in row.values())
    assert row["label"] == "tool refund"
    assert claimed.entry.key_sha256 == journal.digest(raw_key)


def test_an_older_journal_table_gets_the_new_columns(tmp_path):
    engine = create_store_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as connection:  # the table as version 0.1 created it
        connection.execute(
            text(
                "CREATE TABLE governed_ai_journal (scope VARCHAR(64) NOT NULL,"
                " key_sha256 VARCHAR(64) NOT NULL, key TEXT NOT NULL, state VARCHAR(16) NOT NULL,"
                " claim VARCHAR(32) NOT NULL, attempts INTEGER NOT NULL, result TEXT, error TEXT,"
                " created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,"
                " PRIMARY KEY (scope, key_sha256))"
            )
        )
    ensure_tables(engine, [journal_table])
    writer = StoreWriter(keyed_audit_store(engine))
    writer.write_sync(steps=[claim("a"), done("a", {"ok": 1})])
    writer.close()
    assert ReplayJournal(engine, "chat").entries_for_instance(INSTANCE)["a"].result == {"ok": 1}


def test_prepared_writes_store_times_and_values_as_sqlalchemy_reads_them(store_engine: Engine):
    # The writer runs its statements on the driver directly; what it stored must read back through
    # SQLAlchemy exactly as written: aware UTC times to the microsecond, text, numbers.
    audit = keyed_audit_store(store_engine)
    journal = ReplayJournal(store_engine, "chat")
    writer = StoreWriter(audit)
    when = datetime(2026, 12, 2, 13, 45, 7, 123456, tzinfo=UTC)
    stamped = record(1).model_copy(update={"time": when})
    writer.write_sync(records=[stamped], steps=[claim("k1")])
    writer.write_sync(steps=[done("k1", {"answer": "é"}), StepFailed("chat", "k2", "x")])
    writer.write_sync(steps=[claim("k2"), StepFailed("chat", "k2", "server said no")])
    writer.close()

    [stored] = audit.query(limit=None)
    assert stored.time == when and stored.extra == {"n": 1}
    assert audit.verify().ok
    entries = journal.entries_for_instance(INSTANCE)
    assert entries["k1"].state is JournalState.COMPLETED and entries["k1"].result == {"answer": "é"}
    assert entries["k2"].state is JournalState.FAILED
    with store_engine.connect() as connection:
        row = connection.execute(
            select(journal_table.c.created_at, journal_table.c.error).where(
                journal_table.c.key_sha256 == "k2"
            )
        ).one()
    assert row.error == "server said no"
    assert row.created_at.tzinfo is not None and abs(datetime.now(UTC) - row.created_at) < timedelta(
        minutes=5
    )


def test_a_prepared_write_without_a_value_it_needs_names_the_value(store_engine: Engine):
    from governed_ai.core.audit import _MOVE_HEAD

    with store_engine.connect() as connection:
        prepared = prepared_write(connection, _MOVE_HEAD)
        with pytest.raises(ValueError, match="new_hash"):
            prepared.parameters({"new_seq": 3})


def test_the_writer_gets_a_new_connection_after_its_own_broke(tmp_path):
    engine = create_store_engine(f"sqlite:///{tmp_path / 'gov.db'}")
    audit = keyed_audit_store(engine)
    writer = StoreWriter(audit)
    writer.write_sync(records=[record(1)])
    assert writer._connection is not None
    writer._connection.connection.dbapi_connection.close()  # type: ignore[union-attr]  # pulled from under it
    with pytest.raises((sqlite3.ProgrammingError, DBAPIError)):  # this group fails: its callers see it
        writer.write_sync(records=[record(2)])
    writer.write_sync(records=[record(3)])  # the next one lands on a fresh connection
    writer.close()
    assert [r.extra["n"] for r in audit.query(limit=None, order="asc")] == [1, 3]
    assert audit.verify().ok
    engine.dispose()
