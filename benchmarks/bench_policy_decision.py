"""Latency of policy decisions on a ~50-rule policy, against the 50 µs per-decision goal.

Run: .venv/bin/python benchmarks/bench_policy_decision.py [decisions per action, default 100000]
Prints p50/p99 per action in microseconds and the ratio p50 / 50 µs (below 1.0 meets the goal).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import yaml

from governed_ai.core.policy import Decision, PolicyEngine, load_policy_text
from governed_ai.core.subject import Subject

GOAL_US = 50.0
RULE_COUNT = 50


def build_policy(rule_count: int) -> str:
    """A policy shaped like a real platform's: one rule per team/DAG family, globs, tools with constraints."""
    rules = []
    for i in range(rule_count):
        rules.append(
            {
                "name": f"team-{i}",
                "match": {
                    "dag_id": f"team{i}_*",
                    "tags": [f"team{i}", "shared"],
                    "owner": ["ai-*", f"owner{i}"],
                },
                "models": [
                    {
                        "connection": "governed_ai_llm_default",
                        "model": "smollm2*",
                        "max_tokens_per_call": 512,
                    },
                    {"connection": f"conn_{i}_*", "model": f"model-{i}"},
                ],
                "model_routes": {"default": {"model": "smollm2", "fallbacks": [f"model-{i}"]}},
                "tools": [
                    {
                        "name": f"tool_{i}_*",
                        "args": {
                            "order_id": {"regex": "[A-Z]{2}[0-9]{6}", "max_length": 8},
                            "region": {"enum": ["eu", "us"]},
                            "limit": {"min": 1, "max": 50},
                        },
                    }
                ],
                "collections": [{"name": f"kb_{i}_*", "read": True, "write": i % 2 == 0}],
                "redaction": {"custom_patterns": [{"name": f"secret{i}", "regex": f"S{i}-[0-9a-f]{{8}}"}]},
            }
        )
    budgets = [
        {
            "name": f"daily-{i}",
            "scope": "dag",
            "match": {"dag_id": f"team{i}_*"},
            "period": "day",
            "max_tokens": 10**6,
        }
        for i in range(rule_count)
    ]
    return yaml.safe_dump({"version": 1, "rules": rules, "budgets": budgets}, sort_keys=False)


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    p50 = ordered[len(ordered) // 2] / 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000
    return p50, p99


def measure(call: Callable[[int], Decision], count: int) -> tuple[list[int], int]:
    """Per-call latencies in ns, and how many decisions were allowances (both paths are exercised)."""
    samples = []
    allowed = 0
    clock = time.perf_counter_ns
    for i in range(count):
        start = clock()
        decision = call(i)
        samples.append(clock() - start)
        allowed += decision.allowed
    return samples, allowed


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    text = build_policy(RULE_COUNT)
    start = time.perf_counter()
    engine = PolicyEngine(load_policy_text(text))
    load_ms = (time.perf_counter() - start) * 1000

    # Subjects matching early, late and no rules, so the per-rule scan length varies.
    subjects = [
        Subject(dag_id="team0_etl", task_id="summarize", owner="ai-team", tags=frozenset({"team0"})),
        Subject(dag_id="team25_support", task_id="classify", owner="owner25", tags=frozenset({"shared"})),
        Subject(dag_id="team49_rag", task_id="answer", owner="ai-rag", tags=frozenset({"team49", "x"})),
        Subject(dag_id="unknown_dag", task_id="t", owner="nobody"),
    ]
    tool_args = {"order_id": "AB123456", "region": "eu", "limit": 10}
    n = len(subjects)

    cases: dict[str, Callable[[int], Decision]] = {
        "authorize_model": lambda i: engine.authorize_model(
            subjects[i % n], "governed_ai_llm_default", "smollm2" if i % 3 else "smollm2-q8"
        ),
        "authorize_model (per-call model names)": lambda i: engine.authorize_model(
            subjects[i % n], "conn_25_x", f"model-{i % 1000}"
        ),
        "authorize_tool (3 constrained args)": lambda i: engine.authorize_tool(
            subjects[i % n], f"tool_{(i % n) * 16}_lookup", tool_args
        ),
        "authorize_collection": lambda i: engine.authorize_collection(
            subjects[i % n], f"kb_{(i % n) * 16}_docs", "write" if i % 2 else "read"
        ),
    }

    print(f"policy: {RULE_COUNT} rules, {RULE_COUNT} budgets; load + validate + compile: {load_ms:.1f} ms")
    print(f"{count} decisions per action across {n} subjects (first call per subject included)")
    print(f"{'action':42} {'p50 µs':>8} {'p99 µs':>8} {'mean µs':>8} {'p50/goal':>9} {'allowed':>8}")
    for label, call in cases.items():
        samples, allowed = measure(call, count)
        p50, p99 = percentiles(samples)
        mean = statistics.fmean(samples) / 1000
        print(f"{label:42} {p50:8.2f} {p99:8.2f} {mean:8.2f} {p50 / GOAL_US:9.3f} {allowed / count:8.0%}")

    # The uncached path: a fresh engine per decision would be wrong in production, but bounds the cost of
    # the first decision for a task (matching all 50 rules and merging redaction).
    cold = []
    for i in range(2000):
        fresh_subject = Subject(dag_id=f"team{i % RULE_COUNT}_x{i}", task_id="t", tags=frozenset({"shared"}))
        start_ns = time.perf_counter_ns()
        engine.authorize_model(fresh_subject, "governed_ai_llm_default", "smollm2")
        cold.append(time.perf_counter_ns() - start_ns)
    p50, p99 = percentiles(cold)
    label = "first decision for a new task (cache miss)"
    print(f"{label:42} {p50:8.2f} {p99:8.2f} {'':>8} {p50 / GOAL_US:9.3f}")


if __name__ == "__main__":
    main()
