"""Hash-chained audit trail on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import io
import json
import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, text

from governed_ai.core.audit import (
    GENESIS_HASH,
    AuditRecord,
    AuditStore,
    StoredAuditRecord,
    chain_hash,
    unkeyed_chain_hash,
)
from governed_ai.core.audit_anchors import AnchorLog
from governed_ai.core.keys import DeploymentKey
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject

KEY = DeploymentKey.from_text("test-deployment-key-0123456789abcdef", source="test")

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
SUBJECT = Subject(dag_id="support_triage", task_id="classify", run_id="scheduled__2026-11-25", try_number=2)


def model_call(i: int, **fields: Any) -> AuditRecord:
    """A realistic record; values vary with ``i`` so every row hashes differently."""
    defaults: dict[str, Any] = {
        "time": T0 + timedelta(seconds=i),
        "resource": "gpt-small",
        "decision": "allow",
        "rule": "support-models",
        "model": "gpt-small",
        "prompt_version": "triage@3",
        "prompt_tokens": 100 + i,
        "completion_tokens": 20 + i,
        "cost_usd": 0.1 + 0.2 * i,  # binary floats must survive the database round trip exactly
        "latency_ms": 12.5 + i,
        "content": f"ticket {i}: bonjour — ça marche? ✓",
        "extra": {"attempt": i, "labels": ["a", "b"], "ratio": 1 / 3},
    }
    defaults.update(fields)
    return AuditRecord.for_subject(SUBJECT, action="model.call", **defaults)


@pytest.fixture
def anchors(tmp_path: Path) -> AnchorLog:
    return AnchorLog(tmp_path / "anchors")


@pytest.fixture
def store(store_engine: Engine, anchors: AnchorLog) -> AuditStore:
    return AuditStore(store_engine, key=KEY, anchors=anchors)


def filled(store: AuditStore, n: int) -> list[StoredAuditRecord]:
    return store.append_many(model_call(i) for i in range(n))


# -- writing and reading ---------------------------------------------------------------------------------


def test_appended_records_come_back_with_their_place_in_the_chain(store: AuditStore) -> None:
    first = store.append(model_call(0))
    second = store.append(model_call(1, decision="deny", outcome="denied", rule="no-pii"))

    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash
    assert second.hash == chain_hash(
        first.hash, 2, model_call(1, decision="deny", outcome="denied", rule="no-pii"), KEY
    )

    newest, oldest = store.query()
    assert newest == second
    assert oldest == first
    assert oldest.dag_id == "support_triage" and oldest.try_number == 2 and oldest.map_index == -1
    assert oldest.time == T0
    assert oldest.cost_usd == 0.1
    assert oldest.extra == {"attempt": 0, "labels": ["a", "b"], "ratio": 1 / 3}


def test_query_filters_combine(store: AuditStore) -> None:
    other = Subject(dag_id="nightly_rag", task_id="embed", run_id="manual__1")
    store.append_many(
        [
            model_call(0),
            model_call(1, decision="deny", outcome="denied"),
            AuditRecord.for_subject(
                other, action="collection.read", resource="kb", time=T0 + timedelta(seconds=2)
            ),
            AuditRecord.for_subject(
                other, action="tool.call", decision="deny", time=T0 + timedelta(seconds=3)
            ),
            model_call(4),
        ]
    )

    assert [r.seq for r in store.query(dag_id="nightly_rag")] == [4, 3]
    assert [r.seq for r in store.query(decision="deny")] == [4, 2]
    assert [r.seq for r in store.query(dag_id="nightly_rag", decision="deny")] == [4]
    assert [r.seq for r in store.query(action="model.call", order="asc")] == [1, 2, 5]
    assert [r.seq for r in store.query(run_id="scheduled__2026-11-25", task_id="classify")] == [5, 2, 1]
    # since inclusive, until exclusive
    window = store.query(since=T0 + timedelta(seconds=1), until=T0 + timedelta(seconds=4), order="asc")
    assert [r.seq for r in window] == [2, 3, 4]
    assert [r.seq for r in store.query(limit=2)] == [5, 4]
    assert [r.seq for r in store.tail(3)] == [3, 4, 5]


def test_export_jsonl_streams_matching_records_that_rehash_outside_the_database(
    store: AuditStore, tmp_path: Path
) -> None:
    filled(store, 30)
    store.append(AuditRecord(action="validation", outcome="error", error="3 rows failed", time=T0))

    target = tmp_path / "audit.jsonl"
    assert store.export_jsonl(target) == 31
    lines = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, 32))
    # An auditor with the key can re-check the chain from the export alone.
    prev = GENESIS_HASH
    for line in lines:
        record = AuditRecord.model_validate(
            {k: v for k, v in line.items() if k not in ("seq", "prev_hash", "hash")}
        )
        assert line["prev_hash"] == prev
        assert chain_hash(prev, line["seq"], record, KEY) == line["hash"]
        prev = line["hash"]

    buffer = io.StringIO()
    assert store.export_jsonl(buffer, action="validation") == 1
    assert json.loads(buffer.getvalue())["error"] == "3 rows failed"


# -- verification and tamper detection --------------------------------------------------------------------


def test_an_untouched_chain_verifies(store: AuditStore) -> None:
    assert store.verify().ok and store.verify().records_checked == 0

    stored = filled(store, 40)
    store.append(model_call(99, extra={}, content=None, cost_usd=None))

    result = store.verify()
    assert result.ok, result.problem
    assert result.records_checked == 41
    assert result.head_seq == 41
    assert result.head_hash == store.tail(1)[0].hash
    assert stored[-1].hash == store.query(limit=2)[1].hash


def test_verification_streams_in_chunks_across_a_bigger_table(store: AuditStore) -> None:
    # More than one verification chunk (2,000 rows): the seams between chunks must not look like gaps.
    for start in range(0, 4_500, 500):
        store.append_many(model_call(i) for i in range(start, start + 500))
    result = store.verify()
    assert result.ok, result.problem
    assert result.records_checked == 4_500


def test_editing_a_row_is_detected(store: AuditStore, store_engine: Engine) -> None:
    filled(store, 30)
    with store_engine.begin() as connection:
        connection.execute(text("UPDATE governed_ai_audit SET content = 'nothing to see' WHERE seq = 17"))

    result = store.verify()
    assert not result.ok
    assert result.first_bad_seq == 17
    assert result.problem == "hash mismatch at seq 17 (row edited, or the chain was written with another key)"
    assert result.records_checked == 16


def test_editing_a_number_is_detected(store: AuditStore, store_engine: Engine) -> None:
    filled(store, 30)
    with store_engine.begin() as connection:
        connection.execute(text("UPDATE governed_ai_audit SET cost_usd = 0.0 WHERE seq = 5"))

    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 5)


def test_deleting_a_row_is_detected(store: AuditStore, store_engine: Engine) -> None:
    filled(store, 30)
    with store_engine.begin() as connection:
        connection.execute(text("DELETE FROM governed_ai_audit WHERE seq = 17"))

    result = store.verify()
    assert not result.ok
    assert result.first_bad_seq == 17
    assert result.problem == "gap after seq 16 (row deleted)"


def test_deleting_the_newest_rows_is_detected_through_the_chain_head(
    store: AuditStore, store_engine: Engine
) -> None:
    filled(store, 30)
    with store_engine.begin() as connection:
        connection.execute(text("DELETE FROM governed_ai_audit WHERE seq >= 29"))

    result = store.verify()
    assert not result.ok
    assert result.first_bad_seq == 29
    assert result.problem == "chain ends at seq 28 but its head says 30 (rows deleted)"


def test_swapping_two_rows_seq_is_detected_as_reordering(store: AuditStore, store_engine: Engine) -> None:
    filled(store, 30)
    with store_engine.begin() as connection:
        connection.execute(text("UPDATE governed_ai_audit SET seq = -1 WHERE seq = 17"))
        connection.execute(text("UPDATE governed_ai_audit SET seq = 17 WHERE seq = 18"))
        connection.execute(text("UPDATE governed_ai_audit SET seq = 18 WHERE seq = -1"))

    result = store.verify()
    assert not result.ok
    assert result.first_bad_seq == 17
    assert result.problem == "prev_hash at seq 17 does not match seq 16 (rows reordered)"


def test_swapping_two_rows_data_is_detected(store: AuditStore, store_engine: Engine) -> None:
    filled(store, 30)
    columns = ["time", "content", "prompt_tokens", "cost_usd", "extra", "prev_hash", "hash"]
    quoted = ", ".join(f'"{column}"' for column in columns)  # "time" is a keyword in PostgreSQL
    assignments = ", ".join(f'"{column}" = :{column}' for column in columns)
    with store_engine.begin() as connection:
        row_a = connection.execute(text(f"SELECT {quoted} FROM governed_ai_audit WHERE seq = 20")).one()
        row_b = connection.execute(text(f"SELECT {quoted} FROM governed_ai_audit WHERE seq = 21")).one()
        for seq, row in ((20, row_b), (21, row_a)):
            connection.execute(
                text(f"UPDATE governed_ai_audit SET {assignments} WHERE seq = :seq"),
                {**row._asdict(), "seq": seq},
            )

    result = store.verify()
    assert not result.ok
    assert result.first_bad_seq == 20
    assert result.problem == "prev_hash at seq 20 does not match seq 19 (rows reordered)"


def test_a_row_slipped_in_past_the_head_is_detected(store: AuditStore, store_engine: Engine) -> None:
    filled(store, 5)
    with store_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO governed_ai_audit"
                ' (seq, "time", action, decision, outcome, extra, prev_hash, hash)'
                ' SELECT 6, "time", action, decision, outcome, extra, hash, hash'
                " FROM governed_ai_audit WHERE seq = 5"
            )
        )

    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 6)
    assert result.problem == "row at seq 6 lies beyond the chain head (row inserted)"


def test_appending_after_tampering_keeps_the_tamper_visible(store: AuditStore, store_engine: Engine) -> None:
    filled(store, 10)
    with store_engine.begin() as connection:
        connection.execute(
            text("UPDATE governed_ai_audit SET outcome = 'denied', decision = 'deny' WHERE seq = 3")
        )
    store.append_many(model_call(i) for i in range(10, 20))

    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)


# -- keyed chain and anchors: what someone with write access to the database cannot hide ---------------------


def _rewrite_chain(engine: Engine, store: AuditStore, rehash: Any) -> None:
    """Recompute every row's hashes with ``rehash(prev, seq, record)`` and move the head to match: what an
    attacker with database access but without the key can do."""
    prev = GENESIS_HASH
    with engine.begin() as connection:
        for record in store.query(limit=None, order="asc"):
            new_hash = rehash(prev, record.seq, record)
            connection.execute(
                text("UPDATE governed_ai_audit SET prev_hash = :p, hash = :h WHERE seq = :s"),
                {"p": prev, "h": new_hash, "s": record.seq},
            )
            prev = new_hash
        connection.execute(text("UPDATE governed_ai_audit_head SET hash = :h"), {"h": prev})


def _cut_tail_and_move_head(engine: Engine, keep: int) -> None:
    with engine.begin() as connection:
        kept_hash = connection.execute(
            text("SELECT hash FROM governed_ai_audit WHERE seq = :s"), {"s": keep}
        ).scalar_one()
        connection.execute(text("DELETE FROM governed_ai_audit WHERE seq > :s"), {"s": keep})
        connection.execute(
            text("UPDATE governed_ai_audit_head SET seq = :s, hash = :h"), {"s": keep, "h": kept_hash}
        )


def test_a_keyed_chain_is_anchored_outside_the_database_and_verifies(
    store_engine: Engine, anchors: AnchorLog, caplog: pytest.LogCaptureFixture
) -> None:
    store = AuditStore(
        store_engine, key=KEY, anchors=anchors, anchor_every_records=10, anchor_every_seconds=3600
    )
    with caplog.at_level("INFO", logger="governed_ai.core.audit"):
        for start in range(0, 30, 10):
            store.append_many(model_call(i) for i in range(start, start + 10))
    assert store.chain_id is not None
    assert [a.seq for a in anchors.read(store.chain_id).anchors] == [10, 20, 30]
    # The task log holds a second copy of each anchor.
    logged = [r.getMessage() for r in caplog.records if "audit chain anchored" in r.getMessage()]
    assert len(logged) == 3 and store.tail(1)[0].hash in logged[-1]

    result = store.verify()
    assert (result.ok, result.status, result.problem) == (True, "ok", None)
    assert (result.anchors_checked, result.newest_anchor_seq, result.key_id) == (3, 30, KEY.key_id)


def test_truncating_the_tail_and_moving_the_head_fails_through_the_anchors(
    store: AuditStore, store_engine: Engine
) -> None:
    filled(store, 30)  # one batch: anchored at seq 30
    _cut_tail_and_move_head(store_engine, keep=25)

    result = store.verify()
    assert (result.ok, result.status, result.head_seq) == (False, "broken", 25)
    assert result.problem is not None and "cut off the end and the head moved back" in result.problem
    assert result.records_checked == 25  # the shorter chain itself is intact: only the anchor exposes it


def test_a_chain_recomputed_with_the_unkeyed_hash_fails(store: AuditStore, store_engine: Engine) -> None:
    filled(store, 12)
    with store_engine.begin() as connection:
        connection.execute(text("UPDATE governed_ai_audit SET content = 'rewritten' WHERE seq = 7"))
    _rewrite_chain(store_engine, store, unkeyed_chain_hash)

    result = store.verify()
    assert (result.ok, result.status, result.first_bad_seq) == (False, "broken", 1)
    assert result.problem is not None and "plain SHA-256" in result.problem


def test_a_chain_recomputed_with_another_key_fails(store: AuditStore, store_engine: Engine) -> None:
    filled(store, 12)
    other = DeploymentKey.from_text("an-attackers-own-key-0123456789", source="attacker")
    _rewrite_chain(store_engine, store, lambda prev, seq, record: chain_hash(prev, seq, record, other))

    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert result.problem == "hash mismatch at seq 1 (row edited, or the chain was written with another key)"


def test_without_the_key_the_chain_cannot_be_verified(store: AuditStore, store_engine: Engine) -> None:
    filled(store, 5)
    result = AuditStore(store_engine).verify()
    assert (result.ok, result.status, result.records_checked) == (False, "unverifiable", 5)
    assert result.problem is not None and result.problem.startswith("cannot verify")


def test_without_anchors_a_keyed_chain_is_not_called_ok(
    store: AuditStore, store_engine: Engine, anchors: AnchorLog
) -> None:
    filled(store, 5)
    unanchored = AuditStore(store_engine, key=KEY).verify()
    assert (unanchored.ok, unanchored.status) == (False, "unanchored")

    assert store.chain_id is not None
    Path(anchors.describe(store.chain_id)).unlink()  # the anchors removed
    gone = store.verify()
    assert (gone.ok, gone.status) == (False, "unanchored")
    assert gone.problem is not None and "no anchor found" in gone.problem

    assert store.anchor() is not None  # e.g. at the end of a task
    assert store.verify().ok


def test_a_forged_or_edited_anchor_is_not_authentic(store: AuditStore, anchors: AnchorLog) -> None:
    filled(store, 5)
    assert store.chain_id is not None
    path = Path(anchors.describe(store.chain_id))
    line = json.loads(path.read_text().splitlines()[0])
    line["seq"] = 99  # claims a longer chain than there was
    path.write_text(json.dumps(line) + "\n")

    result = store.verify()
    assert (result.ok, result.status) == (False, "broken")
    assert result.problem is not None and "not authentic" in result.problem


def test_an_empty_chain_verifies_and_an_unkeyed_store_still_writes(store_engine: Engine) -> None:
    store = AuditStore(store_engine, key=KEY)
    assert store.verify().ok and store.verify().records_checked == 0
    unkeyed = AuditStore(store_engine)
    unkeyed.append(model_call(0))
    # What an unkeyed store wrote fails under the key: it could have been recomputed by anyone.
    assert store.verify().status == "broken"


# -- the record model ---------------------------------------------------------------------------------------


def test_records_are_normalised_before_they_are_hashed() -> None:
    naive = AuditRecord(action="tool.call", time=datetime(2026, 11, 25, 8, 0))
    assert naive.time == T0
    shifted = AuditRecord(action="tool.call", time=datetime(2026, 11, 25, 9, 0, tzinfo=UTC).astimezone())
    assert shifted.time.utcoffset() == timedelta(0)
    assert AuditRecord(action="x", extra={"pair": (1, 2)}).extra == {"pair": [1, 2]}
    assert AuditRecord(action="x", content="a\x00b").content == "a\ufffdb"

    with pytest.raises(ValidationError):
        AuditRecord(action="x", extra={"when": datetime.now(UTC)})
    with pytest.raises(ValidationError):
        AuditRecord(action="x", decision="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        AuditRecord(action="x", extra={"blob": "x" * 20_000})
    with pytest.raises(ValidationError):
        AuditRecord(action="x", cost_usd=float("nan"))


def test_for_subject_carries_the_task_identity() -> None:
    record = AuditRecord.for_subject(SUBJECT, action="budget.deny", resource="support-daily", decision="deny")
    assert (record.dag_id, record.task_id, record.run_id, record.try_number, record.map_index) == (
        "support_triage",
        "classify",
        "scheduled__2026-11-25",
        2,
        -1,
    )
    assert (record.action, record.resource, record.decision) == ("budget.deny", "support-daily", "deny")
    # A mapped task instance's own index wins over the subject's default.
    assert AuditRecord.for_subject(SUBJECT, action="tool.call", map_index=3).map_index == 3


# -- concurrent writers -----------------------------------------------------------------------------------

WRITER_PROCESSES = 6
RECORDS_PER_WRITER = 120


def _writer(url: str, anchor_dir: str, worker: int, start: Any, results: Any) -> None:
    engine = create_store_engine(url)
    try:
        store = AuditStore(engine, key=KEY, anchors=AnchorLog(anchor_dir), anchor_every_records=50)
        start.wait()
        written = 0
        # Mix single appends and batches so both paths contend for the chain head.
        while written < RECORDS_PER_WRITER:
            if written % 3 == 0:
                store.append(model_call(written, extra={"worker": worker, "n": written}))
                written += 1
            else:
                batch = [
                    model_call(written + j, extra={"worker": worker, "n": written + j}) for j in range(7)
                ]
                store.append_many(batch)
                written += len(batch)
        results.put((worker, written, None))
    except BaseException as error:
        results.put((worker, -1, repr(error)))
    finally:
        engine.dispose()


@pytest.mark.timeout(120)
def test_concurrent_writer_processes_keep_one_linear_chain(store_url: str, tmp_path: Path) -> None:
    engine = create_store_engine(store_url)
    anchor_dir = str(tmp_path / "anchors")
    store = AuditStore(engine, key=KEY, anchors=AnchorLog(anchor_dir))
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results = context.Queue()
    processes = [
        context.Process(target=_writer, args=(store_url, anchor_dir, worker, start, results))
        for worker in range(WRITER_PROCESSES)
    ]
    for process in processes:
        process.start()
    start.set()
    reports = [results.get(timeout=100) for _ in processes]
    for process in processes:
        process.join(timeout=30)

    assert [report[2] for report in reports if report[2] is not None] == []
    total = sum(report[1] for report in reports)
    result = store.verify()
    everything = store.query(limit=None, order="asc")
    engine.dispose()

    assert result.ok, result.problem
    # Every writer process anchored its first append at least; all those anchors agree with the chain.
    assert result.anchors_checked >= WRITER_PROCESSES
    assert result.records_checked == total == len(everything)
    assert [r.seq for r in everything] == list(range(1, total + 1))
    # Every worker's records are all there, in that worker's own order.
    for worker in range(WRITER_PROCESSES):
        mine = [r.extra["n"] for r in everything if r.extra["worker"] == worker]
        assert mine == sorted(mine) and len(mine) == dict((w, n) for w, n, _ in reports)[worker]
