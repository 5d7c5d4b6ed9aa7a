"""Validating 10,000 LLM outputs with a suite of the AI checks: Great Expectations gate vs a plain loop.

Prints rows/s for the quality gate (run_suite + apply_outcome, warm: GX already imported and the suite's
validation definition cached), the one-off cost of the first run in a process (GX import and context),
the share of the gate spent computing derived columns, and a baseline measured in the same run: a plain
Python loop applying the same rules row by row (pydantic, ``re``, the same redactor). It also checks that
both found the same failing rows. Asserts nothing about time.

    .venv/bin/python benchmarks/bench_validation.py [--rows 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from governed_ai.core.redaction import Redactor
from governed_ai.core.validation import (
    DEFAULT_REFUSAL_PATTERNS,
    ValidationSuite,
    apply_outcome,
    conforms_to_schema,
    grounded,
    label_in_set,
    length_between,
    matches_regex,
    no_pii,
    not_empty,
    not_refusal,
    refusal_rate_at_most,
    run_suite,
)

LABELS = ["negative", "positive"]


class Classification(BaseModel):
    sentiment: Literal["negative", "positive"]
    summary: str = Field(max_length=160)


SUITE = ValidationSuite(
    name="bench_support_outputs",
    checks=[
        matches_regex("ticket_id", r"^T-\d{5}$"),
        label_in_set("sentiment", LABELS),
        not_empty("summary"),
        length_between("summary", min_length=3, max_length=160),
        no_pii("summary"),
        conforms_to_schema("output", model=Classification),
        grounded("answer", "retrieved"),
        not_refusal("answer"),
        refusal_rate_at_most("answer", 0.2),
    ],
)

SUMMARIES = [
    "Customer was charged twice for the March subscription and wants the second payment refunded.",
    "App crashes when opening settings on Android since the last update.",
    "Package tracking has not changed for five days.",
    "Asks how to change the account e-mail address.",
    "Whole team locked out, login returns error 500.",
]


def make_rows(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """Synthetic model outputs, ~10% of them wrong in one of the ways the suite catches."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sentiment = rng.choice(LABELS)
        summary = rng.choice(SUMMARIES)
        docs = [f"doc-{rng.randrange(500)}" for _ in range(3)]
        answer = f"Refunds take 5 days, see [{docs[0]}]."
        fault = rng.random()
        if fault < 0.02:
            sentiment = "neutral"
        elif fault < 0.04:
            summary = f"Reply to jane.doe{i}@example.com about the refund."
        elif fault < 0.06:
            answer = "I don't know."
        elif fault < 0.08:
            answer = "Refunds take 5 days."
        elif fault < 0.09:
            summary = "  "
        output: Any = {"sentiment": sentiment, "summary": summary}
        if 0.09 <= fault < 0.10:
            output = '{"sentiment": "positive"'
        rows.append(
            {
                "ticket_id": f"T-{i:05d}",
                "sentiment": sentiment,
                "summary": summary,
                "output": output,
                "answer": answer,
                "retrieved": docs,
            }
        )
    return rows


def plain_loop(rows: list[dict[str, Any]]) -> set[int]:
    """The baseline: the same rules, hand-written, row by row."""
    redactor = Redactor()
    ticket = re.compile(r"^T-\d{5}$")
    refusals = [re.compile(p) for p in DEFAULT_REFUSAL_PATTERNS]
    failing: set[int] = set()
    refusal_count = 0
    for index, row in enumerate(rows):
        ok = True
        ok &= isinstance(row.get("ticket_id"), str) and bool(ticket.search(row["ticket_id"]))
        ok &= row.get("sentiment") in LABELS
        summary = row.get("summary")
        ok &= isinstance(summary, str) and bool(summary.strip()) and 3 <= len(summary) <= 160
        ok &= isinstance(summary, str) and not redactor.redact(summary).changed
        try:
            output = row.get("output")
            if isinstance(output, str):
                Classification.model_validate_json(output)
            else:
                Classification.model_validate(output)
        except ValidationError:
            ok = False
        answer = str(row.get("answer") or "")
        ok &= any(re.search(rf"(?<![\w-]){re.escape(d)}(?![\w-])", answer) for d in row["retrieved"])
        refusal = any(p.search(answer) for p in refusals)
        refusal_count += refusal
        ok &= not refusal
        if not ok:
            failing.add(index)
    _ = refusal_count / len(rows) <= 0.2
    return failing


def gate(rows: list[dict[str, Any]]) -> set[int]:
    result = apply_outcome(run_suite(SUITE, rows), rows, outcome="quarantine")
    return {q["index"] for q in result.quarantined_rows}


def best_of(repeat: int, fn: Callable[[], set[int]]) -> tuple[float, float, set[int]]:
    times = []
    found: set[int] = set()
    for _ in range(repeat):
        started = time.perf_counter()
        found = fn()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times), found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = make_rows(args.rows)
    print(f"{args.rows:,} outputs, suite {SUITE.name!r}: {len(SUITE.checks)} checks")

    started = time.perf_counter()
    gate(rows[:10])
    print(f"  first run in this process (GX import + context + suite): {time.perf_counter() - started:.2f} s")

    derived_start = time.perf_counter()
    from governed_ai.core.validation.runner import _frame

    frame = _frame(rows, SUITE.columns)
    for check in SUITE.checks:
        check.add_columns(frame)
    derived = time.perf_counter() - derived_start

    gx_best, gx_median, gx_failing = best_of(args.repeat, lambda: gate(rows))
    base_best, base_median, base_failing = best_of(args.repeat, lambda: plain_loop(rows))

    def line(label: str, best: float, median: float) -> None:
        print(f"  {label:<38} best {best:6.3f} s = {args.rows / best:>9,.0f} rows/s (median {median:.3f} s)")

    line("quality gate (GX, warm)", gx_best, gx_median)
    line("baseline: plain Python loop", base_best, base_median)
    print(f"  gate / baseline time: {gx_best / base_best:.2f}x")
    print(
        f"  derived columns (pandas + redactor + pydantic): {derived:.3f} s "
        f"({derived / gx_best:.0%} of the gate)"
    )
    print(
        f"  failing rows: gate {len(gx_failing):,}, baseline {len(base_failing):,}, "
        f"same rows: {'yes' if gx_failing == base_failing else 'NO'}"
    )


if __name__ == "__main__":
    main()
