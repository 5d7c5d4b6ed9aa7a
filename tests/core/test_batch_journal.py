"""The batch replay journal on SQLite and a real PostgreSQL: bulk record/lookup, overwrite, group commit."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import Engine, func, select

from governed_ai.core.audit import AuditRecord, AuditStore
from governed_ai.core.batch import BatchJournal, JournalWriter, journal_prefix
from governed_ai.core.journal import JournalState, journal_table
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from tests.audit_support import keyed_audit_store

SUBJECT = Subject(dag_id="batch_dag", task_id="classify", run_id="run-1", try_number=1)
PARAMS = {"temperature": 0.0, "max_tokens": 20}


def prefix(subject: Subject = SUBJECT, **changes: object) -> str:
    kwargs: dict[str, object] = {"prompt_version": "sha256:abc", "model": "m", "parameters": PARAMS}
    kwargs.update(changes)
    return journal_prefix(subject, **kwargs)  # type: ignore[arg-type]


def rows_in(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(journal_table)).scalar_one())


def test_the_prefix_ignores_the_try_but_not_what_makes_results_differ():
    base = prefix()
    assert prefix(SUBJECT.model_copy(update={"try_number": 3})) == base  # a retry replays the first try
    assert prefix(parameters=dict(reversed(list(PARAMS.items())))) == base  # settings order is irrelevant
    different = [
        prefix(SUBJECT.model_copy(update={"run_id": "run-2"})),
        prefix(SUBJECT.model_copy(update={"task_id": "other"})),
        prefix(SUBJECT.model_copy(update={"dag_id": "other"})),
        prefix(SUBJECT.model_copy(update={"map_index": 4})),
        prefix(prompt_version="sha256:def"),
        prefix(model="m2"),
        prefix(parameters={**PARAMS, "temperature": 0.7}),
    ]
    assert base not in different
    assert len(set(different)) == len(different)


def test_bulk_record_then_bulk_lookup_returns_only_completed_items(store_engine):
    journal = BatchJournal(store_engine, prefix())
    results = {f"item-{i}": {"content": f"label {i}", "usage": {"total_tokens": i}} for i in range(1_200)}
    assert journal.record(results.items()) == 1_200
    asked = [*results, "never-run-1", "never-run-2"]
    found = journal.completed(asked)  # more keys than one IN (...) chunk
    assert found == results
    assert journal.record([]) == 0


def test_entries_are_scoped_by_prefix(store_engine):
    mine = BatchJournal(store_engine, prefix())
    other_run = BatchJournal(store_engine, prefix(SUBJECT.model_copy(update={"run_id": "run-2"})))
    mine.record([("a", {"v": 1})])
    assert other_run.completed(["a"]) == {}
    other_run.record([("a", {"v": 2})])
    assert mine.completed(["a"]) == {"a": {"v": 1}}
    assert other_run.completed(["a"]) == {"a": {"v": 2}}


def test_recording_an_item_again_overwrites_it(store_engine):
    journal = BatchJournal(store_engine, prefix())
    journal.record([("a", {"v": 1}), ("b", {"v": 1})])
    journal.record([("a", {"v": 2})])
    assert journal.completed(["a", "b"]) == {"a": {"v": 2}, "b": {"v": 1}}
    assert rows_in(store_engine) == 2
    with store_engine.connect() as connection:
        states = set(connection.execute(select(journal_table.c.state, journal_table.c.scope)))
    assert states == {(JournalState.COMPLETED.value, "batch")}


def test_the_writer_commits_in_groups_and_each_write_returns_once_durable(store_url, store_engine):
    journal = BatchJournal(store_engine, prefix())
    writer = JournalWriter(journal)
    elsewhere = create_store_engine(store_url)  # another connection pool: sees only committed rows

    reader = BatchJournal(elsewhere, prefix())

    async def write_all() -> list[bool]:
        async def one(i: int) -> bool:
            await writer.write(f"item-{i}", {"n": i})
            # What another process could read right after this write returned:
            return reader.completed([f"item-{i}"]) == {f"item-{i}": {"n": i}}

        return await asyncio.gather(*(one(i) for i in range(300)))

    try:
        visible_after = asyncio.run(write_all())
    finally:
        writer.close()
        elsewhere.dispose()
    assert all(visible_after)
    assert journal.completed([f"item-{i}" for i in range(300)]) == {f"item-{i}": {"n": i} for i in range(300)}
    assert 1 <= writer.commits < 300 / 4  # grouped: far fewer transactions than items


def test_a_failed_commit_is_raised_in_every_waiting_item_and_the_writer_goes_on(store_engine):
    journal = BatchJournal(store_engine, prefix())
    writer = JournalWriter(journal)

    async def run() -> None:
        with pytest.raises(TypeError):
            await writer.write("bad", {"not json": object()})
        await writer.write("good", {"v": 1})

    try:
        asyncio.run(run())
    finally:
        writer.close()
    assert journal.completed(["bad", "good"]) == {"good": {"v": 1}}


def audit_record(item_key: str, outcome: str = "ok") -> AuditRecord:
    return AuditRecord.for_subject(SUBJECT, action="model.call", outcome=outcome, extra={"item": item_key})


def test_audit_records_are_committed_with_the_group_before_the_journal_rows(store_url, store_engine):
    audit = keyed_audit_store(store_engine)
    journal = BatchJournal(store_engine, prefix())
    writer = JournalWriter(journal, audit)
    elsewhere = create_store_engine(store_url)
    reader = AuditStore(elsewhere)

    async def run() -> list[bool]:
        async def one(i: int) -> bool:
            await writer.write(f"item-{i}", {"n": i}, audit_record(f"item-{i}"))
            audited = {r.extra["item"] for r in reader.query(action="model.call", limit=None)}
            return f"item-{i}" in audited

        done = await asyncio.gather(*(one(i) for i in range(50)))
        await writer.record_audit(audit_record("failed-item", "error"))  # audited, not journaled
        return list(done)

    try:
        assert all(asyncio.run(run()))
    finally:
        writer.close()
        elsewhere.dispose()
    records = audit.query(action="model.call", order="asc", limit=None)
    assert sorted(r.extra["item"] for r in records) == sorted(
        [*(f"item-{i}" for i in range(50)), "failed-item"]
    )
    assert "failed-item" not in journal.completed(["failed-item"])
    assert audit.verify().ok


def test_audit_records_need_an_audit_store(store_engine):
    writer = JournalWriter(BatchJournal(store_engine, prefix()))
    try:
        with pytest.raises(ValueError, match="no audit store"):
            asyncio.run(writer.write("a", {"v": 1}, audit_record("a")))
    finally:
        writer.close()
