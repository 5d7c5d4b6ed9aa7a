"""LLMBatchOperator: inputs, XCom vs file output, the failure policy, replay on retry, clear errors.

``execute`` is called directly with a named fake task context against FakeOpenAIServer (a fake model
with scripted replies, over real HTTP) and a real governance store; one test uses the real local model.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from pydantic import BaseModel

from governed_ai.hooks.governance import GovernanceHook
from governed_ai.operators.batch import LLMBatchOperator
from tests.conftest import FakeDag, FakeTask, FakeTaskInstance
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

POLICY = """
version: 1
rules:
  - name: batch-tests
    match: {dag_id: batch_dag}
    models:
      - {connection: test_llm, model: fake-model, max_tokens_per_call: 64}
      - {connection: governed_ai_llm_default, model: smollm2, max_tokens_per_call: 64}
budgets:
  - {name: batch-run, scope: dag, match: {dag_id: batch_dag}, period: run, max_tokens: BUDGET}
"""


def task_context(*, try_number: int = 1, run_id: str = "manual__batch", task_id: str = "classify") -> Any:
    """A named fake of the Airflow task context, with a chosen try number (a retry is try 2)."""
    ti = FakeTaskInstance(dag_id="batch_dag", task_id=task_id, run_id=run_id, try_number=try_number)
    return {"ti": ti, "task": FakeTask(), "dag": FakeDag(), "params": {"prefix": "Classify"}}


@pytest.fixture(scope="module")
def module_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(models=("fake-model",)) as server:
        yield server


@pytest.fixture
def fake(module_server, governance_policy, monkeypatch, tmp_path) -> FakeOpenAIServer:
    governance_policy(POLICY.replace("BUDGET", "1000000"))
    monkeypatch.setenv("AIRFLOW_CONN_TEST_LLM", module_server.connection_json(default_model="fake-model"))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow_home"))
    module_server.replies.clear()
    module_server.requests.clear()
    module_server.paths.clear()
    module_server.default = ScriptedReply(content="positive")
    return module_server


def batch(**kwargs: Any) -> LLMBatchOperator:
    defaults: dict[str, Any] = {
        "task_id": "classify",
        "prompt_template": "{{ params.prefix }}: {{ item.text }}",
        "key_field": "id",
        "max_tokens": 16,
        "llm_conn_id": "test_llm",
        "concurrency": 4,
    }
    defaults.update(kwargs)
    return LLMBatchOperator(**defaults)


def tickets(n: int) -> list[dict[str, str]]:
    return [{"id": f"T{i}", "text": f"ticket {i}"} for i in range(n)]


def audit(action: str) -> list[Any]:
    return GovernanceHook().governor.audit.query(action=action, dag_id="batch_dag", order="asc", limit=None)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# -- parse time --------------------------------------------------------------------------------------------


def test_needs_items_or_an_input_path():
    with pytest.raises(ValueError, match=r"classify: give 'items' \(a list\) or 'input_path'"):
        LLMBatchOperator(task_id="classify", prompt_template="x {{ item }}")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_failure_rate": 1.5}, "'max_failure_rate' is a fraction in 0..1"),
        ({"max_tokens": 0}, "'max_tokens' must be a positive integer"),
        ({"max_xcom_items": -1}, "'max_xcom_items' must be 0 or more"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"prompt_template": "Classify {{ item.text "}, "prompt template does not parse"),
        ({"prompt_template": "  "}, "prompt_template must not be empty"),
        ({"output_schema": {"type": "object"}}, "'output_schema' must be a pydantic model class"),
    ],
)
def test_bad_parameters_are_refused_at_parse_time_naming_the_task(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message) as raised:
        batch(items=tickets(1), **kwargs)
    if isinstance(raised.value, ValueError) and "output_schema" not in kwargs:
        assert str(raised.value).startswith("classify: ")


def test_templated_fields():
    assert set(LLMBatchOperator.template_fields) == {"items", "input_path", "model", "output_path"}


# -- results -----------------------------------------------------------------------------------------------


def test_small_batches_return_results_inline(fake):
    xcom = batch(items=tickets(5)).execute(task_context())

    json.dumps(xcom)  # XCom-safe
    assert [r["key"] for r in xcom["results"]] == ["T0", "T1", "T2", "T3", "T4"]
    assert {(r["status"], r["content"]) for r in xcom["results"]} == {("ok", "positive")}
    assert xcom["failures"] == []
    assert xcom["summary"]["ok"] == 5 and xcom["summary"]["total"] == 5
    assert xcom["model"] == "fake-model" and xcom["prompt_version"].startswith("sha256:")
    sent = sorted(r["messages"][-1]["content"] for r in fake.chat_requests)
    assert sent == [f"Classify: ticket {i}" for i in range(5)]  # params are in scope of the template
    (summary,) = audit("batch.summary")
    assert summary.outcome == "ok" and summary.extra["ok"] == 5
    assert len(audit("model.call")) == 5
    assert [r.outcome for r in audit("model.authorize")] == ["ok"]


def test_large_batches_go_to_a_file_with_a_manifest_in_xcom(fake, tmp_path):
    xcom = batch(items=tickets(7), max_xcom_items=5).execute(task_context())

    assert "results" not in xcom and "failures" not in xcom
    results = Path(xcom["results_path"])
    expected_dir = (
        tmp_path / "airflow_home" / "governed_ai" / "outputs" / "batch" / "batch_dag" / "manual__batch"
    )
    assert results == expected_dir / "classify.jsonl"
    assert [r["key"] for r in read_jsonl(xcom["results_path"])] == [f"T{i}" for i in range(7)]
    assert read_jsonl(xcom["failures_path"]) == []
    assert xcom["summary"]["ok"] == 7


def test_output_path_forces_a_file_and_failures_go_beside_it(fake, tmp_path):
    fake.script(ScriptedReply(status=400, content="bad"))
    target = tmp_path / "out" / "labels.jsonl"
    xcom = batch(items=tickets(3), output_path=str(target), concurrency=1, max_failure_rate=0.5).execute(
        task_context()
    )
    assert xcom["results_path"] == str(target)
    assert xcom["failures_path"] == str(tmp_path / "out" / "labels.failures.jsonl")
    (failure,) = read_jsonl(xcom["failures_path"])
    assert failure["key"] == "T0" and failure["status"] == "failed" and "HTTP 400" in failure["error"]
    assert [r["status"] for r in read_jsonl(str(target))] == ["failed", "ok", "ok"]
    assert not list(target.parent.glob("*.tmp"))


def write_input(path: Path, rows: list[dict[str, str]]) -> None:
    if path.suffix == ".csv":
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=["id", "text"])
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("name", ["tickets.jsonl", "tickets.csv", "tickets.json"])
def test_input_files(fake, tmp_path, name):
    path = tmp_path / name
    write_input(path, tickets(4))
    xcom = batch(input_path=str(path)).execute(task_context())
    assert [r["key"] for r in xcom["results"]] == ["T0", "T1", "T2", "T3"]
    assert sorted(r["messages"][-1]["content"] for r in fake.chat_requests) == [
        f"Classify: ticket {i}" for i in range(4)
    ]


def test_items_rendered_to_json_text_are_parsed(fake):
    op = batch(items=json.dumps(tickets(2)))  # what a template like "{{ ti.xcom_pull(...) | tojson }}" gives
    assert [r["key"] for r in op.execute(task_context())["results"]] == ["T0", "T1"]


# -- item keys in the task's own outputs: the policy decides ---------------------------------------------

EMAIL_KEY = "jane.roe@example.com"
SECRET_KEY = "AKIAIOSFODNN7EXAMPLE"  # an AWS access key id used as an item key


@pytest.mark.parametrize(
    ("mode", "shown_raw"),
    [("redacted", {"T1"}), ("allow_pii", {"T1", EMAIL_KEY}), ("digest", set())],
)
def test_item_keys_appear_in_outputs_only_as_the_policy_allows(fake, governance_policy, tmp_path, mode,
                                                                 shown_raw):  # fmt: skip
    from governed_ai.core.client import item_digest
    from governed_ai.core.subject import Subject

    policy = POLICY.replace("BUDGET", "1000000") + f"defaults: {{output_item_keys: {mode}}}\n"
    governance_policy(policy)
    # The first item of each task fails, so the failures (inline and file) have a key too.
    failing, passing = ScriptedReply(status=400, content="bad"), ScriptedReply(content="positive")
    fake.script(failing, passing, passing, failing)
    rows = [{"id": key, "text": f"ticket {n}"} for n, key in enumerate([EMAIL_KEY, "T1", SECRET_KEY])]
    inline = batch(task_id="inline", items=rows, concurrency=1, max_failure_rate=0.5).execute(
        task_context(task_id="inline")
    )
    target = tmp_path / "out.jsonl"
    filed = batch(
        task_id="filed", items=rows, output_path=str(target), concurrency=1, max_failure_rate=0.5
    ).execute(task_context(task_id="filed"))
    governor = GovernanceHook().governor
    for task_id, results, failures in (
        ("inline", inline["results"], inline["failures"]),
        ("filed", read_jsonl(filed["results_path"]), read_jsonl(filed["failures_path"])),
    ):
        subject = Subject(dag_id="batch_dag", task_id=task_id, run_id="manual__batch")
        expected = [
            key if key in shown_raw else "digest:" + item_digest(governor, subject, key)
            for key in (EMAIL_KEY, "T1", SECRET_KEY)
        ]
        assert [r["key"] for r in results] == expected
        assert [r["position"] for r in results] == [0, 1, 2]
        assert [f["key"] for f in failures] == expected[:1]
        # The digest is the one the audit trail holds for that item.
        items = {r.extra.get("item") for r in audit("model.call") if r.task_id == task_id}
        assert {k.removeprefix("digest:") for k in expected if k.startswith("digest:")} <= items
    assert SECRET_KEY not in json.dumps([inline, read_jsonl(filed["results_path"])])  # never, in any mode


# -- clear errors ------------------------------------------------------------------------------------------


def test_duplicate_keys_are_a_clear_error_before_any_call(fake):
    rows = [*tickets(3), {"id": "T1", "text": "again"}]
    with pytest.raises(AirflowFailException, match=r"classify: .*items 1 and 3 have the same 'id' value"):
        batch(items=rows).execute(task_context())
    assert fake.chat_requests == []


def test_missing_input_file_and_bad_input_are_clear(fake, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"classify: 'input_path' .*nope.jsonl' does not exist"):
        batch(input_path=str(tmp_path / "nope.jsonl")).execute(task_context())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": \n')
    # Retrying cannot fix bad input: these fail the task without retries.
    with pytest.raises(AirflowFailException, match=r"classify: .*bad.jsonl line 2 is not valid JSON"):
        batch(input_path=str(bad)).execute(task_context())
    with pytest.raises(AirflowFailException, match="'items' rendered to text that is not a JSON list"):
        batch(items="not json").execute(task_context())
    with pytest.raises(AirflowFailException, match="the batch is empty"):
        batch(items=[]).execute(task_context())


def test_an_item_the_template_cannot_render_fails_with_the_reason(fake):
    rows = [*tickets(2), {"id": "T9", "body": "no text"}]
    xcom = batch(items=rows, max_failure_rate=0.5).execute(task_context())
    (failure,) = xcom["failures"]
    assert (
        failure["key"] == "T9"
        and "prompt template failed" in failure["error"]
        and "'text'" in failure["error"]
    )
    assert len(fake.chat_requests) == 2


# -- failure policy ----------------------------------------------------------------------------------------


def test_failures_within_the_rate_succeed_and_are_reported(fake):
    fake.script(ScriptedReply(status=400, content="bad item"))
    xcom = batch(items=tickets(10), concurrency=1, max_failure_rate=0.1).execute(task_context())
    assert [f["key"] for f in xcom["failures"]] == ["T0"]
    assert xcom["summary"]["failed"] == 1
    (summary,) = audit("batch.summary")
    assert summary.outcome == "partial"


def test_too_many_failures_fail_the_task_retryably_and_a_retry_runs_only_those(fake):
    fake.script(*[ScriptedReply(status=400, content="bad item")] * 3)
    op = batch(items=tickets(10), concurrency=1, max_failure_rate=0.2)
    with pytest.raises(AirflowException, match=r"3 of 10 items failed.*max_failure_rate 20.0%") as raised:
        op.execute(task_context())
    assert not isinstance(raised.value, AirflowFailException)  # Airflow may retry it
    assert "T0: EndpointRejected" in str(raised.value) and "HTTP 400" in str(raised.value)
    assert len(fake.chat_requests) == 10

    retry = op.execute(task_context(try_number=2))
    assert len(fake.chat_requests) == 13  # only the three failed items were called again
    assert retry["summary"]["replayed"] == 7 and retry["summary"]["ok"] == 3


def test_a_governance_denial_fails_without_retry_and_without_calls(fake):
    with pytest.raises(AirflowFailException, match="classify: denied by governance.*gpt-4o"):
        batch(items=tickets(3), model="gpt-4o").execute(task_context())
    assert fake.chat_requests == []
    denied = audit("model.authorize")  # one per item that was started before the batch stopped
    assert 1 <= len(denied) <= 3 and {r.decision for r in denied} == {"deny"}


def test_a_budget_stop_above_the_rate_fails_without_retry(fake, governance_policy):
    governance_policy(POLICY.replace("BUDGET", "120"))  # room for about three items' worst case
    fake.default = ScriptedReply(content="x", prompt_tokens=5, completion_tokens=5)
    with pytest.raises(AirflowFailException, match=r"classify: stopped by budget: .*batch-run.*not run"):
        batch(items=tickets(20), concurrency=1, budget_block_size=2).execute(task_context())
    assert 0 < len(fake.chat_requests) < 20
    (summary,) = audit("batch.summary")
    assert summary.extra["stopped_by_budget"] and summary.extra["not_run"] == 20 - len(fake.chat_requests)


# -- replay ------------------------------------------------------------------------------------------------


def test_a_second_execute_of_the_same_task_instance_replays_everything(fake):
    first = batch(items=tickets(6)).execute(task_context())
    calls = len(fake.chat_requests)
    again = batch(items=tickets(6)).execute(task_context(try_number=2))

    assert len(fake.chat_requests) == calls == 6  # nothing paid for twice
    assert again["summary"]["replayed"] == 6 and again["summary"]["ok"] == 0
    assert [r["status"] for r in again["results"]] == ["replayed"] * 6
    strip = ("status", "replayed_attempts", "latency_ms")
    assert [{k: v for k, v in r.items() if k not in strip} for r in again["results"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in first["results"]
    ]
    replays = audit("model.replay")
    assert len(replays) == 6 and {r.try_number for r in replays} == {2}


def test_replay_is_per_run_and_per_prompt(fake):
    batch(items=tickets(2)).execute(task_context())
    batch(items=tickets(2)).execute(task_context(run_id="manual__other"))
    batch(items=tickets(2), prompt_template="Other: {{ item.text }}").execute(task_context())
    batch(items=tickets(2), temperature=0.5).execute(task_context())
    assert len(fake.chat_requests) == 8


# -- the real model ----------------------------------------------------------------------------------------


class Sentiment(BaseModel):
    sentiment: Literal["positive", "negative"]


@pytest.mark.real_model
def test_a_small_batch_on_the_real_local_model(
    local_model_connection, governance_policy, monkeypatch, tmp_path
):
    governance_policy(POLICY.replace("BUDGET", "100000"))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow_home"))
    reviews = [
        {"id": "r1", "text": "I love it, works perfectly and arrived early."},
        {"id": "r2", "text": "Terrible. It broke on day one and support never answered."},
        {"id": "r3", "text": "Great value, very happy with this purchase."},
        {"id": "r4", "text": "Awful quality, a waste of money."},
    ]
    op = LLMBatchOperator(
        task_id="classify",
        items=reviews,
        key_field="id",
        prompt_template="Is this review positive or negative? Review: {{ item.text }}",
        output_schema=Sentiment,
        model="smollm2",
        max_tokens=24,
        temperature=0.0,
        concurrency=2,
    )
    xcom = op.execute(task_context())

    assert [r["key"] for r in xcom["results"]] == ["r1", "r2", "r3", "r4"]
    assert xcom["failures"] == [], xcom["failures"]
    for row in xcom["results"]:
        Sentiment.model_validate(row["output"])  # grammar-constrained JSON: always valid, not always right
        assert row["usage"]["completion_tokens"] <= 24
    calls = audit("model.call")
    assert [(r.model, r.outcome) for r in calls] == [("smollm2", "ok")] * 4
    (budget,) = GovernanceHook().governor.ledger.status()
    assert budget.spent_tokens == sum(r["usage"]["total_tokens"] for r in xcom["results"])

    again = op.execute(task_context(try_number=2))
    assert again["summary"]["replayed"] == 4
    assert len(audit("model.call")) == 4  # the retry made no model call


@pytest.mark.parametrize(
    ("processes", "items", "concurrency", "executor", "expected"),
    [
        ("auto", 100, 64, "LocalExecutor", 1),  # too few items to be worth a fork
        ("auto", 1_000, 64, "LocalExecutor", 2),  # one per core (2 given below)
        ("auto", 100_000, 8, "LocalExecutor", 1),  # few calls in flight: waiting on the endpoint, not CPU
        ("auto", 1_000, 64, "CeleryExecutor", 1),  # not yet known to work inside a Celery worker
        ("auto", 1_000, 64, "LocalExecutor,CeleryExecutor", 1),
        (4, 1_000, 2, "CeleryExecutor", 2),  # an explicit number is obeyed, within concurrency
        (4, 3, 8, "LocalExecutor", 3),  # never more processes than items
    ],
)
def test_how_many_processes_run_a_batch(processes, items, concurrency, executor, expected, monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    op = LLMBatchOperator(
        task_id="classify", items=[], prompt_template="x", processes=processes, concurrency=concurrency
    )
    assert op.processes == processes
    assert op._processes(items) == expected


def test_processes_default_to_auto():
    assert LLMBatchOperator(task_id="classify", items=[], prompt_template="x").processes == "auto"
