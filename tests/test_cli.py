"""The ``governed-ai`` command: policy check, audit tail/query/export/verify and budget status.

``main([...])`` is called directly; the store is a real SQLite file filled through a real Governor (with a
fake model call) and the real AuditStore.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sqlalchemy import text

from governed_ai.cli import main
from governed_ai.core.audit import AuditStore, unkeyed_chain_hash
from governed_ai.core.audit_anchors import AnchorLog
from governed_ai.core.governor import Governor
from governed_ai.core.keys import DeploymentKey, load_or_create_key_file
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.policy import PolicyProvider
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.core.subject import Subject
from tests.fakes.governed_calls import record_governed_call

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_POLICY = REPO / "example_dags" / "policies" / "governance_policy.yaml"

POLICY = """\
version: 1
rules:
  - name: cli-rule
    match: {dag_id: "cli_*"}
    models:
      - {connection: llm, model: good-model}
budgets:
  - name: cli-budget
    scope: dag
    match: {dag_id: "cli_*"}
    period: day
    max_tokens: 100000
"""


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "audit.key"


@pytest.fixture
def anchor_dir(tmp_path: Path) -> Path:
    return tmp_path / "anchors"


@pytest.fixture
def store_url(tmp_path: Path, key_file: Path, anchor_dir: Path) -> str:
    """A store with 2 allowed calls and 1 denied one, written through a Governor with a keyed, anchored
    audit chain."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine = create_store_engine(url)
    audit = AuditStore(engine, key=load_or_create_key_file(key_file), anchors=AnchorLog(anchor_dir))
    governor = Governor(policy=PolicyProvider(text=POLICY), ledger=BudgetLedger(engine), audit=audit)
    subject = Subject(dag_id="cli_dag", task_id="ask", run_id="run-1")

    def chat(model: str) -> str:  # 30 prompt + 12 completion tokens per call
        return record_governed_call(governor, subject, model, prompt_tokens=30, completion_tokens=12)

    assert chat("good-model") == "ok"
    assert chat("bad-model") == "denied"
    assert chat("good-model") == "ok"
    audit.anchor()  # what the end of a governed task does
    engine.dispose()
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_policy_check_accepts_the_example_policy(capsys):
    code, out, _ = run(capsys, "policy", "check", str(EXAMPLE_POLICY))

    # Counted independently of the policy loader (the example file grows with the examples).
    raw = yaml.safe_load(EXAMPLE_POLICY.read_text())
    assert code == 0
    assert f"OK — {len(raw['rules'])} rule(s), {len(raw['budgets'])} budget(s)" in out


def test_policy_check_rejects_a_broken_file_with_its_line(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nrules:\n  - name: r\n    modles: []\n")

    code, out, err = run(capsys, "policy", "check", str(broken))

    assert code == 1
    assert out == ""
    assert str(broken) in err and "line 4" in err and "modles" in err


def test_audit_tail_shows_the_newest_records_oldest_first(capsys, store_url):
    code, out, _ = run(capsys, "--store-url", store_url, "audit", "tail", "-n", "2")

    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].split()[0] == "4" and "model.authorize" in lines[0]
    assert lines[1].split()[0] == "5" and "model.call" in lines[1] and "tokens=42" in lines[1]


def test_audit_query_filters_by_decision(capsys, store_url):
    code, out, _ = run(capsys, "--store-url", store_url, "audit", "query", "--decision", "deny")

    lines = out.splitlines()
    assert code == 0 and len(lines) == 1
    assert "model.authorize llm/bad-model deny" in lines[0]
    assert "denied model 'bad-model'" in lines[0]


def test_audit_query_filters_by_action(capsys, store_url):
    code, out, _ = run(capsys, "--store-url", store_url, "audit", "query", "--action", "model.call")

    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert all("model.call llm/good-model allow rule=cli-rule ok tokens=42" in line for line in lines)


def test_audit_export_writes_jsonl(capsys, store_url, tmp_path):
    target = tmp_path / "audit.jsonl"

    code, out, _ = run(
        capsys, "--store-url", store_url, "audit", "export", str(target), "--dag-id", "cli_dag"
    )

    assert code == 0 and "exported 5 record(s)" in out
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2]["decision"] == "deny" and len(records[2]["hash"]) == 64
    assert records[1]["prev_hash"] == records[0]["hash"]


def verify(capsys: pytest.CaptureFixture[str], store_url: str, *extra: str) -> tuple[int, dict, str]:
    code, out, err = run(capsys, "--store-url", store_url, "audit", "verify", *extra)
    # Importing Airflow (to find the key the way tasks do) may log a line to stdout before the report.
    return code, json.loads(out[out.index("{\n") :]), err


def test_audit_verify_detects_a_tampered_row(capsys, store_url, key_file, anchor_dir):
    keyed = ("--key-file", str(key_file), "--anchor-path", str(anchor_dir))
    code, report, _ = verify(capsys, store_url, *keyed)
    assert code == 0, report
    assert report["ok"] is True and report["records_checked"] == 5 and report["anchors_checked"] >= 1

    engine = create_store_engine(store_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE governed_ai_audit SET error = 'nothing to see' WHERE seq = 3"))
    engine.dispose()

    code, report, err = verify(capsys, store_url, *keyed)
    assert code == 1
    assert report["ok"] is False and report["first_bad_seq"] == 3
    assert "seq 3" in report["problem"] and "BROKEN" in err


def test_audit_verify_without_the_key_cannot_verify(capsys, store_url, anchor_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "no-key-here"))
    code, report, err = verify(capsys, store_url, "--anchor-path", str(anchor_dir))
    assert code == 1
    assert (report["ok"], report["status"]) == (False, "unverifiable")
    assert "UNVERIFIABLE" in err


def test_audit_verify_finds_the_key_where_the_tasks_do(capsys, store_url, key_file, anchor_dir, monkeypatch):
    # Airflow's own config reading: the _cmd form of the sensitive option (secrets backends work alike).
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__AUDIT_HMAC_KEY_CMD", f"cat {key_file}")
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__AUDIT_ANCHOR_PATH", str(anchor_dir))
    code, report, _ = verify(capsys, store_url)
    assert code == 0, report
    assert report["key_id"] == DeploymentKey.from_text(key_file.read_text(), source="t").key_id


def test_audit_verify_fails_a_cut_tail_with_a_moved_head_and_a_recomputed_chain(
    capsys, store_url, key_file, anchor_dir
):
    keyed = ("--key-file", str(key_file), "--anchor-path", str(anchor_dir))
    engine = create_store_engine(store_url)
    with engine.begin() as connection:
        kept = connection.execute(text("SELECT hash FROM governed_ai_audit WHERE seq = 4")).scalar_one()
        connection.execute(text("DELETE FROM governed_ai_audit WHERE seq > 4"))
        connection.execute(text("UPDATE governed_ai_audit_head SET seq = 4, hash = :h"), {"h": kept})
    code, report, _ = verify(capsys, store_url, *keyed)
    assert (code, report["status"], report["head_seq"]) == (1, "broken", 4)
    assert "cut off the end" in report["problem"]

    # Recompute the (shorter) chain with the unkeyed hash, as the old version wrote it.
    prev = "0" * 64
    for record in AuditStore(engine).query(limit=None, order="asc"):
        new_hash = unkeyed_chain_hash(prev, record.seq, record)
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE governed_ai_audit SET prev_hash = :p, hash = :h WHERE seq = :s"),
                {"p": prev, "h": new_hash, "s": record.seq},
            )
        prev = new_hash
    with engine.begin() as connection:
        connection.execute(text("UPDATE governed_ai_audit_head SET hash = :h"), {"h": prev})
    engine.dispose()
    code, report, _ = verify(capsys, store_url, *keyed)
    assert (code, report["status"], report["first_bad_seq"]) == (1, "broken", 1)
    assert "plain SHA-256" in report["problem"]


def test_audit_anchor_copies_the_head_now(capsys, store_url, key_file, tmp_path):
    elsewhere = tmp_path / "other-anchors"
    keyed = ("--key-file", str(key_file), "--anchor-path", str(elsewhere))
    code, report, _ = verify(capsys, store_url, *keyed)
    assert (code, report["status"]) == (1, "unanchored")

    code, out, _ = run(capsys, "--store-url", store_url, "audit", "anchor", *keyed)
    assert code == 0 and "anchored seq 5" in out
    code, report, _ = verify(capsys, store_url, *keyed)
    assert code == 0 and report["newest_anchor_seq"] == 5


def test_budget_status_shows_spent_tokens(capsys, store_url):
    code, out, _ = run(capsys, "--store-url", store_url, "budget", "status")

    (line,) = out.splitlines()
    assert code == 0
    assert line.startswith("cli-budget [day ")
    assert "84/100,000 tokens" in line and "reserved 0 tokens" in line


def test_budget_status_on_an_empty_store(capsys, tmp_path):
    code, out, _ = run(capsys, "--store-url", f"sqlite:///{tmp_path / 'empty.db'}", "budget", "status")

    assert code == 0 and "no budget has been used yet" in out


def test_store_url_falls_back_to_the_config_env_var(capsys, store_url, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", store_url)

    code, out, _ = run(capsys, "audit", "query", "--decision", "deny")

    assert code == 0 and len(out.splitlines()) == 1


# -- policy init: the starter policy a wheel user begins with -------------------------------------------


def test_policy_init_writes_a_starter_policy_that_checks_and_grants_only_what_it_says(capsys, tmp_path):
    path = tmp_path / "policies" / "governance_policy.yaml"

    code, out, _ = run(capsys, "policy", "init", str(path))

    assert code == 0 and f"governed-ai policy check {path}" in out
    assert "# EDIT" in path.read_text()  # commented for the person who edits it
    code, out, _ = run(capsys, "policy", "check", str(path))
    assert code == 0 and "OK — 1 rule(s), 1 budget(s)" in out

    engine = PolicyProvider(path).engine()
    granted = Subject(dag_id="ai_summaries", task_id="summarise")
    assert engine.authorize_model(granted, "governed_ai_llm_default", "gpt-4o-mini").allowed
    assert engine.resolve_model(granted, "governed_ai_llm_default", "default") == ["gpt-4o-mini"]
    # Fail-closed: another DAG, another model or another connection is denied.
    assert not engine.authorize_model(
        Subject(dag_id="etl", task_id="t"), "governed_ai_llm_default", "gpt-4o-mini"
    ).allowed
    assert not engine.authorize_model(granted, "governed_ai_llm_default", "gpt-4o").allowed
    assert not engine.authorize_model(granted, "other_llm", "gpt-4o-mini").allowed
    redaction = engine.redaction_for(granted)
    assert redaction.prompts and redaction.outputs and not redaction.store_content
    assert [b.name for b in engine.budgets_for(granted)] == ["ai-dags-daily"]


def test_policy_init_never_overwrites_without_force(capsys, tmp_path):
    path = tmp_path / "governance_policy.yaml"
    path.write_text("version: 1\n# my own policy\n")

    code, _, err = run(capsys, "policy", "init", str(path))
    assert code == 1 and "--force" in err
    assert path.read_text() == "version: 1\n# my own policy\n"

    code, _, _ = run(capsys, "policy", "init", str(path), "--force")
    assert code == 0 and "name: ai-dags" in path.read_text()


def test_policy_init_defaults_to_the_provider_home_under_airflow_home(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))

    code, out, _ = run(capsys, "policy", "init")

    written = tmp_path / "governed_ai" / "governance_policy.yaml"
    assert code == 0 and written.is_file() and str(written) in out


# -- cache status / purge: the governed response cache ----------------------------------------------------


@pytest.fixture
def cache_url(tmp_path: Path) -> str:
    """A store with three cached replies: two of prompt version labels@1 (stored 10 days ago and now), one
    of labels@2 (now), written the way the store writer writes them."""
    from datetime import timedelta

    from governed_ai.core.response_cache import CacheWrite, ResponseCache, apply_cache_writes
    from governed_ai.core.sqlstore import utc_now, write_transaction

    url = f"sqlite:///{tmp_path / 'cache.db'}"
    engine = create_store_engine(url)
    ResponseCache(engine)
    now = utc_now()
    entries = [("a" * 64, "labels@1", now - timedelta(days=10)), ("b" * 64, "labels@1", now),
               ("c" * 64, "labels@2", now)]  # fmt: skip
    for key, version, when in entries:
        with write_transaction(engine) as connection:
            apply_cache_writes(
                connection, [CacheWrite(key, "chat", "llm/m", version, "r", {"completion": {}})], now=when
            )
    engine.dispose()
    return url


def test_cache_status_counts_entries_per_prompt_version(capsys, cache_url):
    code, out, _ = run(capsys, "--store-url", cache_url, "cache", "status")

    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines()] == [
        "chat prompt_version=labels@1",
        "chat prompt_version=labels@2",
    ]
    assert "2 entries" in out.splitlines()[0] and "1 entry" in out.splitlines()[1]


def test_cache_purge_by_age_then_by_prompt_version(capsys, cache_url):
    code, out, _ = run(capsys, "--store-url", cache_url, "cache", "purge", "--older-than", "7d")
    assert code == 0 and "purged 1 cached reply" in out

    code, out, _ = run(capsys, "--store-url", cache_url, "cache", "purge", "--prompt-version", "labels@1")
    assert code == 0 and "purged 1 cached reply" in out

    _, out, _ = run(capsys, "--store-url", cache_url, "cache", "status")
    assert out.startswith("chat prompt_version=labels@2: 1 entry")


def test_cache_purge_needs_a_filter_and_a_readable_age(capsys, cache_url):
    code, _, err = run(capsys, "--store-url", cache_url, "cache", "purge")
    assert code == 2 and "--older-than" in err and "--all" in err

    code, _, err = run(capsys, "--store-url", cache_url, "cache", "purge", "--older-than", "a week")
    assert code == 2 and "7d" in err

    code, out, _ = run(capsys, "--store-url", cache_url, "cache", "purge", "--all")
    assert code == 0 and "purged 3 cached replies" in out
    _, out, _ = run(capsys, "--store-url", cache_url, "cache", "status")
    assert "the response cache is empty" in out
