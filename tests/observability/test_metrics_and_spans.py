"""Metrics and trace spans derived from audit records: through real StatsD (UDP) and the OTel SDK."""

from __future__ import annotations

import re
import socket
from datetime import UTC, datetime

import pytest

from governed_ai.core.audit import AuditRecord
from governed_ai.core.observability import MetricsObserver, SpanObserver
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from governed_ai.operators.llm import LLMOperator
from tests.audit_support import keyed_audit_store
from tests.conftest import fake_context
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

SUBJECT = Subject(dag_id="obs_dag", task_id="classify", run_id="r1")
CALL = AuditRecord.for_subject(
    SUBJECT,
    action="model.call",
    time=datetime(2026, 11, 25, 12, 0, 1, tzinfo=UTC),
    resource="llm/small",
    decision="allow",
    rule="obs-rule",
    model="small",
    prompt_tokens=120,
    completion_tokens=30,
    cost_usd=0.000123,
    latency_ms=250.0,
)
DENIAL = AuditRecord.for_subject(
    SUBJECT, action="tool.authorize", resource="delete_records", decision="deny", outcome="denied", rule=None
)
QUERY = AuditRecord.for_subject(
    SUBJECT,
    action="collection.query",
    resource="kb_support",
    decision="allow",
    latency_ms=12.0,
    extra={"queries": 2, "retrieved": [{"id": "a1", "sha256": "x"}, {"id": "b2", "sha256": "y"}]},
)


class RecordingSink:
    """A named fake metrics backend that keeps what it was sent."""

    def __init__(self) -> None:
        self.counters: list[tuple[str, int, dict]] = []
        self.timers: list[tuple[str, float, dict]] = []

    def incr(self, stat, count=1, *, tags=None):
        self.counters.append((stat, count, tags or {}))

    def timing(self, stat, ms, *, tags=None):
        self.timers.append((stat, ms, tags or {}))


STATSD_LINE = re.compile(r"[A-Za-z0-9_.\-]+:-?[0-9]+(\.[0-9]+)?\|(c|ms|g)(\|@[0-9.]+)?")


def test_metrics_from_records():
    sink = RecordingSink()
    MetricsObserver(sink)([CALL, DENIAL, QUERY])
    counters = {
        (name, tags.get("model") or tags.get("action") or tags.get("collection")): n
        for name, n, tags in sink.counters
    }
    assert counters[("governed_ai.model.calls", "small")] == 1
    assert counters[("governed_ai.model.prompt_tokens", "small")] == 120
    assert counters[("governed_ai.model.completion_tokens", "small")] == 30
    assert counters[("governed_ai.model.cost_micro_usd", "small")] == 123
    assert counters[("governed_ai.denials", "tool.authorize")] == 1
    assert counters[("governed_ai.retrieval.queries", "kb_support")] == 2
    tags = {"dag_id": "obs_dag", "task_id": "classify", "model": "small", "outcome": "ok"}
    assert sink.timers == [("governed_ai.model.latency", 250.0, tags)]


def test_counters_of_one_group_are_summed_and_sent_once_timers_one_by_one():
    sink = RecordingSink()
    other_model = CALL.model_copy(update={"model": "large"})
    MetricsObserver(sink)([CALL, CALL, other_model, CALL])
    calls = [(n, tags["model"]) for name, n, tags in sink.counters if name == "governed_ai.model.calls"]
    assert sorted(calls) == [(1, "large"), (3, "small")]
    tokens = {
        tags["model"]: n for name, n, tags in sink.counters if name == "governed_ai.model.prompt_tokens"
    }
    assert tokens == {"small": 360, "large": 120}
    assert len(sink.timers) == 4


def test_observers_run_after_commit_and_never_fail_the_write(tmp_path):
    seen = []

    def broken(records):
        raise RuntimeError("metrics backend down")

    engine = create_store_engine(f"sqlite:///{tmp_path / 'a.db'}")
    store = keyed_audit_store(engine, observers=[broken, seen.extend])
    store.append_many([CALL, QUERY])
    assert [r.action for r in seen] == ["model.call", "collection.query"]
    assert len(store.tail(10)) == 2 and store.verify().ok


@pytest.fixture
def otel():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_spans_follow_genai_conventions_under_the_current_span(otel):
    provider, exporter = otel
    tracer = provider.get_tracer("airflow-task")
    with tracer.start_as_current_span("task classify") as task_span:
        SpanObserver(tracer_provider=provider)([CALL, DENIAL, QUERY])
    spans = {s.name: s for s in exporter.get_finished_spans()}
    chat = spans["chat small"]
    assert chat.parent.span_id == task_span.get_span_context().span_id
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.request.model"] == "small"
    assert chat.attributes["gen_ai.usage.input_tokens"] == 120
    assert (chat.end_time - chat.start_time) == 250_000_000
    assert chat.end_time == int(CALL.time.timestamp() * 1e9)
    retrieval = spans["retrieval kb_support"]
    assert list(retrieval.attributes["governed_ai.retrieved_ids"]) == ["a1", "b2"]
    assert not any("delete_records" in name for name in spans)  # denials are metrics, not spans


def test_a_failed_call_is_an_error_span(otel):
    provider, exporter = otel
    failed = CALL.model_copy(update={"outcome": "error", "error": "RateLimitError: slow down"})
    SpanObserver(tracer_provider=provider)([failed])
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"] == "RateLimitError"


@pytest.fixture
def statsd_listener(monkeypatch):
    """A real UDP socket standing where a StatsD server would, and Airflow's Stats pointed at it."""
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics import stats_utils

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_ON", "True")
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_HOST", "127.0.0.1")
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PORT", str(sock.getsockname()[1]))
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PREFIX", "airflow")
    stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)
    yield sock
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_ON", "False")
    stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)
    sock.close()


def received(sock) -> list[str]:
    lines = []
    while True:
        try:
            data, _ = sock.recvfrom(65536)
        except TimeoutError:
            return lines
        lines.extend(data.decode().splitlines())


def test_an_operator_call_reaches_statsd(statsd_listener, governance_policy, monkeypatch):
    governance_policy(
        "version: 1\nrules:\n  - name: obs\n    match: {dag_id: obs_dag}\n"
        "    models: [{connection: governed_ai_llm_default, model: fake-model}]\n"
    )
    with FakeOpenAIServer(
        default=ScriptedReply(content="fine", prompt_tokens=11, completion_tokens=4)
    ) as server:
        monkeypatch.setenv("AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT", server.connection_json())
        LLMOperator(task_id="classify", prompt="hi", model="fake-model").execute(
            fake_context("obs_dag", "classify")
        )
    lines = received(statsd_listener)
    assert "airflow.governed_ai.model.calls:1|c" in lines, lines
    assert "airflow.governed_ai.model.prompt_tokens:11|c" in lines
    assert any(
        line.startswith("airflow.governed_ai.model.latency:") and line.endswith("|ms") for line in lines
    )
    # Every line is a well-formed StatsD datagram: no None, object repr or binary leaked into a name or value.
    malformed = [line for line in lines if not STATSD_LINE.fullmatch(line)]
    assert malformed == []
