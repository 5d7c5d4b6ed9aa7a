"""GovernedRetrieval: policy grants, audit records and redaction around real Chroma.

Real PolicyProvider (inline YAML), real AuditStore on SQLite, real Chroma (embedded and server).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from governed_ai.core.audit import AuditStore
from governed_ai.core.errors import GovernanceDenied
from governed_ai.core.governor import Governor
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.policy import PolicyProvider
from governed_ai.core.retrieval import SourceDocument, chunk_records
from governed_ai.core.retrieval.governed import GovernedRetrieval, PurgeRequest
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from tests.audit_support import keyed_audit_store

POLICY = """
version: 1
rules:
  - name: kb-writer
    match: {dag_id: "ingest_*"}
    collections: [{name: "kb_*", read: true, write: true}]
  - name: kb-reader
    match: {dag_id: "rag_*"}
    collections: [{name: "kb_*", read: true}]
    redaction:
      custom_patterns: [{name: ticket_secret, regex: "TKT-[0-9a-f]{16}"}]
"""
WRITER = Subject(dag_id="ingest_kb", task_id="ingest", run_id="r1")
READER = Subject(dag_id="rag_answers", task_id="retrieve", run_id="r1")
STRANGER = Subject(dag_id="other_dag", task_id="t", run_id="r1")
EMAIL = "alice@example.com"
TICKET = "TKT-0123456789abcdef"

DOCS = [
    SourceDocument("Refunds are issued within 14 days after the return arrives.", "refunds.md"),
    SourceDocument(f"Password resets: write to {EMAIL} from your account address.", "account.md"),
    SourceDocument(f"Escalations quote the internal ticket {TICKET} in the subject.", "escalation.md"),
]


def oldest_first(audit: AuditStore, action: str) -> list:
    return sorted(audit.query(action=action), key=lambda r: r.seq)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_store_engine(f"sqlite:///{tmp_path / 'gov.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def audit(engine: Engine) -> AuditStore:
    return keyed_audit_store(engine)


@pytest.fixture
def retrieval(store, audit: AuditStore, engine: Engine) -> GovernedRetrieval:
    governor = Governor(policy=PolicyProvider(text=POLICY), ledger=BudgetLedger(engine), audit=audit)
    return GovernedRetrieval(governor, store)


def test_ingest_is_authorized_audited_and_idempotent(retrieval, audit, collection_name):
    first = retrieval.ingest(WRITER, collection_name, DOCS)
    second = retrieval.ingest(WRITER, collection_name, DOCS)
    assert (first.chunks, first.new_chunks) == (3, 3)
    assert (second.chunks, second.new_chunks, second.collection_count) == (3, 0, 3)
    records = oldest_first(audit, "collection.ingest")
    assert [r.extra["new_chunks"] for r in records] == [3, 0]
    assert all(r.rule == "kb-writer" and r.resource == collection_name for r in records)
    assert [r.decision for r in oldest_first(audit, "collection.write.authorize")] == ["allow", "allow"]


def test_ingest_redacts_secrets_and_pii_before_storing(retrieval, store, collection_name):
    report = retrieval.ingest(WRITER, collection_name, DOCS)
    assert report.redactions >= 1
    stored = store.collection(collection_name).get(include=["documents"])["documents"]
    assert not any(EMAIL in text for text in stored)


def test_write_without_grant_is_denied_audited_and_writes_nothing(retrieval, store, audit, collection_name):
    with pytest.raises(GovernanceDenied, match="write"):
        retrieval.ingest(READER, collection_name, DOCS)
    assert not store.exists(collection_name)
    (denial,) = oldest_first(audit, "collection.write.authorize")
    assert denial.decision == "deny" and denial.dag_id == READER.dag_id


def test_unknown_task_may_not_even_read(retrieval, audit, collection_name):
    retrieval.ingest(WRITER, collection_name, DOCS)
    with pytest.raises(GovernanceDenied, match="no rule matches"):
        retrieval.query(STRANGER, collection_name, ["refund"])
    assert oldest_first(audit, "collection.query") == []
    assert [r.decision for r in oldest_first(audit, "collection.read.authorize")] == ["deny"]


def test_query_results_are_traceable_in_the_audit_trail(retrieval, audit, collection_name):
    retrieval.ingest(WRITER, collection_name, DOCS)
    (result,) = retrieval.query(READER, collection_name, ["how long do refunds take"], n_results=2)
    assert result.contexts[0].source == "refunds.md"
    (record,) = oldest_first(audit, "collection.query")
    assert record.rule == "kb-reader"
    assert [(r["id"], r["sha256"]) for r in record.extra["retrieved"]] == [
        (c.id, c.content_hash[:16]) for c in result.contexts
    ]
    assert record.content is None  # store_content is off by default: the query text is not kept
    assert audit.verify().ok


def test_retrieved_text_is_redacted_before_anyone_sees_it(retrieval, store, collection_name):
    # Stored without redaction (e.g. written before the policy existed): the read side still redacts.
    store.upsert(
        collection_name,
        chunk_records(
            [SourceDocument(d.text, d.source, d.metadata) for d in DOCS],
            ingested_at=1,
        ),
    )
    (result,) = retrieval.query(READER, collection_name, ["internal ticket escalation subject"], n_results=3)
    payload = json.dumps(result.to_xcom())
    assert TICKET not in payload and EMAIL not in payload
    assert result.redactions >= 2
    assert "untrusted data" in result.to_xcom()["prompt_context"]


def test_purge_by_source_and_age_is_audited(retrieval, store, audit, collection_name):
    retrieval.ingest(WRITER, collection_name, DOCS)
    assert retrieval.purge(WRITER, collection_name, PurgeRequest(sources=["account.md"])) == 1
    future = datetime.now(UTC) + timedelta(minutes=1)
    assert retrieval.purge(WRITER, collection_name, PurgeRequest(ingested_before=future)) == 2
    assert store.count(collection_name) == 0
    purges = oldest_first(audit, "collection.purge")
    assert [p.extra["deleted"] for p in purges] == [1, 2]
    assert purges[0].extra["sources"] == ["account.md"]


def test_a_source_named_after_a_customer_is_purged_by_its_real_name_and_audited_redacted(
    retrieval, store, audit, collection_name
):
    named = SourceDocument("Notes on the customer's refund.", f"tickets/{EMAIL}.md")
    retrieval.ingest(WRITER, collection_name, [*DOCS, named])
    assert retrieval.purge(WRITER, collection_name, PurgeRequest(sources=[f"tickets/{EMAIL}.md"])) == 1
    assert store.count(collection_name) == 3
    (purge,) = oldest_first(audit, "collection.purge")
    # The whole name reads as an e-mail address ("/" may appear in one): it is stored and audited redacted.
    assert EMAIL not in json.dumps(purge.extra) and purge.extra["sources"] == ["[REDACTED:EMAIL]"]


def test_purge_needs_write_permission(retrieval, store, collection_name):
    retrieval.ingest(WRITER, collection_name, DOCS)
    with pytest.raises(GovernanceDenied):
        retrieval.purge(READER, collection_name, PurgeRequest(sources=["refunds.md"]))
    assert store.count(collection_name) == 3


def test_readiness_counts_and_freshness(retrieval, collection_name):
    assert retrieval.readiness(READER, collection_name) == (
        False,
        0,
        f"collection {collection_name!r} does not exist yet",
    )
    before = datetime.now(UTC) - timedelta(seconds=5)
    retrieval.ingest(WRITER, collection_name, DOCS)
    assert retrieval.readiness(READER, collection_name, min_count=3)[0]
    assert not retrieval.readiness(READER, collection_name, min_count=4)[0]
    assert retrieval.readiness(READER, collection_name, newer_than=before)[0]
    assert not retrieval.readiness(READER, collection_name, newer_than=datetime.now(UTC) + timedelta(1))[0]
    with pytest.raises(GovernanceDenied):
        retrieval.readiness(STRANGER, collection_name)


def test_a_write_the_policy_wants_approved_waits_for_it_and_writes_nothing_before(
    store, audit, engine, collection_name
):
    from governed_ai.core.approval import record_answer
    from governed_ai.core.errors import ApprovalRequired

    needs_approval = POLICY + (
        '  - name: prod-writes-approved\n    match: {dag_id: "ingest_*"}\n'
        f'    require_approval: [{{collection_writes: ["{collection_name}"], approvers: [kb-owner]}}]\n'
    )
    governor = Governor(policy=PolicyProvider(text=needs_approval), ledger=BudgetLedger(engine), audit=audit)
    retrieval = GovernedRetrieval(governor, store)
    with pytest.raises(ApprovalRequired) as raised:
        retrieval.ingest(WRITER, collection_name, DOCS)
    assert (raised.value.action, raised.value.resource, raised.value.approvers) == (
        "collection.write", collection_name, ("kb-owner",),
    )  # fmt: skip
    assert not store.exists(collection_name) and oldest_first(audit, "collection.ingest") == []
    with pytest.raises(ApprovalRequired):  # purging is a write too
        retrieval.purge(WRITER, collection_name, PurgeRequest(sources=["refunds.md"]))
    record_answer(governor, WRITER, action="collection.write", resource=collection_name,
                  rule="prod-writes-approved", answer="approved", approver="kb-owner")  # fmt: skip
    assert retrieval.ingest(WRITER, collection_name, DOCS).new_chunks == 3
    # Another run of the same task asks again.
    with pytest.raises(ApprovalRequired):
        retrieval.ingest(WRITER.model_copy(update={"run_id": "r2"}), collection_name, DOCS)
