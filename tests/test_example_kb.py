"""Knowledge-base example DAGs: ingest into embedded Chroma, then answer with retrieval and the real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EXAMPLE_DAGS = Path(__file__).resolve().parent.parent / "example_dags"
EXPECTED_FIRST_SOURCE = {"Q1": "refunds.md", "Q2": "account.md", "Q3": "shipping.md", "Q4": "warranty.md"}


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(EXAMPLE_DAGS))


def test_answering_is_scheduled_on_the_ingest_asset(dagbag):
    ingest = dagbag.dags["kb_ingest"]
    answering = dagbag.dags["kb_answering"]
    (outlet,) = ingest.get_task("purge_stale").outlets
    assert outlet.uri == "chroma://kb_support/"
    assert [a.uri for a in answering.timetable.asset_condition.objects] == [outlet.uri]


@pytest.mark.airflow
@pytest.mark.real_model
def test_ingest_then_answer_with_sources(airflow_db, local_model_connection, dagbag):
    from airflow.utils.state import DagRunState

    import example_dags.kb_answering as answering
    from governed_ai.hooks.chroma import ChromaHook
    from governed_ai.hooks.governance import GovernanceHook

    assert dagbag.dags["kb_ingest"].test().state == DagRunState.SUCCESS
    count = ChromaHook().store(None).count("kb_support")
    assert dagbag.dags["kb_ingest"].test().state == DagRunState.SUCCESS  # nightly rerun: no duplicates
    assert ChromaHook().store(None).count("kb_support") == count

    assert dagbag.dags["kb_answering"].test().state == DagRunState.SUCCESS
    rows = [
        json.loads(line)
        for line in sorted(answering.output_dir().glob("*.jsonl"))[-1].read_text().splitlines()
    ]
    assert [r["question_id"] for r in rows] == list(EXPECTED_FIRST_SOURCE)
    for row in rows:
        assert row["source_files"][0] == EXPECTED_FIRST_SOURCE[row["question_id"]], row
        assert row["answer"], row
        assert len(row["sources"]) == 1

    audit = GovernanceHook().governor.audit  # keyed and anchored as the tasks wrote it
    (query,) = [r for r in audit.query(action="collection.query") if r.dag_id == "kb_answering"][:1]
    assert {r["id"] for r in query.extra["retrieved"]} == {i for row in rows for i in row["sources"]}
    assert query.rule == "rag-answering"
    assert audit.verify().ok
