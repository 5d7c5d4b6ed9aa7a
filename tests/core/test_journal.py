"""ReplayJournal on SQLite and a real PostgreSQL: claim, complete, replay, in-doubt, reclaim, races."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import Engine, select

from governed_ai.core.journal import (
    JournalConflict,
    JournalState,
    ReplayJournal,
    journal_table,
    sha256_digest,
)
from governed_ai.core.sqlstore import create_store_engine

KEY = '["dag","run","task",-1,"1","issue_refund","abc"]'


@pytest.fixture
def journal(store_engine: Engine) -> ReplayJournal:
    return ReplayJournal(store_engine, "tool")


def test_first_begin_claims_then_complete_makes_later_begins_replay(journal):
    first = journal.begin(KEY)
    assert first.status == "claimed"
    assert first.entry.state is JournalState.STARTED
    assert first.entry.attempts == 1

    done = journal.complete(KEY, {"refund_id": "R-1", "amounts": [1.5, 2]})
    assert done.state is JournalState.COMPLETED

    again = journal.begin(KEY)
    assert again.status == "completed"
    assert again.result == {"refund_id": "R-1", "amounts": [1.5, 2]}
    assert again.entry.attempts == 1  # a replay is not a new claim
    assert journal.lookup(KEY) == again.entry


def test_started_but_unfinished_work_is_in_doubt_unless_the_caller_may_repeat_it(journal):
    assert journal.begin(KEY).status == "claimed"
    doubt = journal.begin(KEY)
    assert doubt.status == "in_doubt"
    assert doubt.entry.state is JournalState.STARTED

    reclaimed = journal.begin(KEY, reclaim_in_doubt=True)
    assert reclaimed.status == "claimed"
    assert reclaimed.entry.attempts == 2


def test_a_clean_failure_is_claimed_again_with_the_error_cleared(journal):
    journal.begin(KEY)
    failed = journal.fail(KEY, "ConnectionError: payment API down")
    assert failed.state is JournalState.FAILED
    assert failed.error == "ConnectionError: payment API down"

    retry = journal.begin(KEY)
    assert retry.status == "claimed"
    assert retry.entry.attempts == 2
    assert retry.entry.error is None


def test_completing_what_is_not_started_is_a_conflict(journal):
    with pytest.raises(JournalConflict, match="found no entry"):
        journal.complete(KEY, 1)
    journal.begin(KEY)
    journal.complete(KEY, 1)
    with pytest.raises(JournalConflict, match="found state 'completed'"):
        journal.complete(KEY, 2)
    with pytest.raises(JournalConflict, match="found state 'completed'"):
        journal.fail(KEY, "late failure")
    assert journal.begin(KEY).result == 1


def test_results_must_be_json(journal):
    journal.begin(KEY)
    with pytest.raises(ValueError, match="must be JSON"):
        journal.complete(KEY, {"value": float("nan")})
    with pytest.raises(ValueError, match="must be JSON"):
        journal.complete(KEY, {"value": object()})
    assert journal.lookup(KEY).state is JournalState.STARTED


def test_scopes_are_separate_and_lookup_of_unknown_keys_is_none(store_engine):
    tools = ReplayJournal(store_engine, "tool")
    batch = ReplayJournal(store_engine, "batch")
    tools.begin(KEY)
    tools.complete(KEY, "tool result")
    assert batch.lookup(KEY) is None
    assert batch.begin(KEY).status == "claimed"
    assert tools.lookup("never seen") is None


def test_rows_hold_the_digest_of_the_key_never_the_key(journal, store_engine):
    long_key = KEY + "x" * 5_000  # longer than a PostgreSQL btree entry may be: the digest is the key
    journal.begin(long_key, label="tool issue_refund")
    journal.complete(long_key, None)
    with store_engine.connect() as connection:
        row = connection.execute(select(journal_table)).mappings().one()
    assert row["key_sha256"] == sha256_digest(long_key)
    assert row["label"] == "tool issue_refund"
    assert long_key not in str(dict(row))
    assert journal.begin(long_key).status == "completed"


def test_a_keyed_digest_makes_other_keys(store_engine):
    keyed = ReplayJournal(store_engine, "tool", digest=lambda text: sha256_digest("secret|" + text))
    keyed.begin(KEY)
    keyed.complete(KEY, 1)
    assert ReplayJournal(store_engine, "tool").lookup(KEY) is None  # the unkeyed digest finds nothing
    assert keyed.lookup(KEY).result == 1


def test_concurrent_claims_of_one_key_have_exactly_one_winner(store_url):
    threads = 8
    engines = [create_store_engine(store_url) for _ in range(threads)]
    ReplayJournal(engines[0], "tool")  # create the table before the race
    barrier = threading.Barrier(threads)
    statuses: list[str] = []
    lock = threading.Lock()

    def claim(engine: Engine) -> None:
        journal = ReplayJournal(engine, "tool")
        barrier.wait()
        status = journal.begin(KEY).status
        with lock:
            statuses.append(status)

    workers = [threading.Thread(target=claim, args=(engine,)) for engine in engines]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for engine in engines:
        engine.dispose()
    assert Counter(statuses) == {"claimed": 1, "in_doubt": threads - 1}


def test_scope_must_be_sensible(store_engine):
    with pytest.raises(ValueError, match="scope must be 1-64"):
        ReplayJournal(store_engine, "")
    with pytest.raises(ValueError, match="must not be empty"):
        ReplayJournal(store_engine, "tool").begin("")
