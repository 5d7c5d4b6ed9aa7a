"""Redactor throughput: microseconds per text and texts per second on one core.

Run: ``.venv/bin/python benchmarks/bench_redaction.py``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from governed_ai.core.redaction import RedactionSettings, Redactor

CLEAN_PROMPT = (
    "You are helping the data platform team review the nightly sales pipeline. Summarise the main risks "
    "in how customer records move from the ingestion bucket to the warehouse, which teams own each stage, "
    "and what the retention rules are for intermediate artifacts. List the open action items from the "
    "last review, suggest three improvements for monitoring and alerting, and keep the answer short; the "
    "audience includes people outside engineering who approve budgets and staffing. Use plain language, "
    "avoid jargon, and mention the 2024 Q3 incident only if it is still relevant."
)
assert len(CLEAN_PROMPT) >= 500

PROMPT_WITH_FINDINGS = (
    "Customer Jane Roe (jane.roe@example.com, +44 20 7946 0958) paid with card 4111 1111 1111 1111 "
    "and asked for a refund to IBAN DE89 3704 0044 0532 0130 00. The loader failed to connect with "
    "postgres://loader:Pa55w0rd-2024@db.internal:5432/sales and the retry used "
    "Authorization: Bearer 9a8b7c6d5e4f3a2b1c0d9e8f7a6b. Its config still says password = 'hunter2x' "
    "and the deploy token ghp_0123456789abcdefghijABCDEFGHIJ012345 was pasted in the ticket. "
    "Please draft a reply to the customer and a short incident note for the team."
)

XCOM_VALUE = {
    "prompt": CLEAN_PROMPT,
    "response": PROMPT_WITH_FINDINGS,
    "usage": {"prompt_tokens": 512, "completion_tokens": 128, "cost_usd": 0.0042},
    "documents": [{"id": i, "text": CLEAN_PROMPT[: 120 + i], "score": 0.9 - i / 100} for i in range(10)],
}

KNOWN_SECRETS = [f"known-secret-value-{i:03d}" for i in range(100)]


def _count_strings(value: object) -> int:
    if isinstance(value, str):
        return 1
    if isinstance(value, dict):
        return sum(_count_strings(k) + _count_strings(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_count_strings(v) for v in value)
    return 0


def _measure(label: str, func: Callable[[], object], *, repeat: int = 7, number: int = 0) -> None:
    if number == 0:
        # Calibrate so one round takes roughly 0.2 s.
        number = 1
        while True:
            start = time.perf_counter()
            for _ in range(number):
                func()
            if time.perf_counter() - start > 0.2:
                break
            number *= 2
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            func()
        rounds.append((time.perf_counter() - start) / number)
    best = min(rounds)
    median = statistics.median(rounds)
    print(f"{label:<62} {best * 1e6:9.1f} us best {median * 1e6:9.1f} us median {1 / median:10.0f} /s")


def main() -> None:
    """Print the figures."""
    default = Redactor()
    with_known = Redactor(known_secrets=KNOWN_SECRETS)
    everything = Redactor(RedactionSettings(high_entropy_secrets=True, ip_addresses=True))

    findings = default.redact(PROMPT_WITH_FINDINGS).findings
    print(
        f"clean prompt: {len(CLEAN_PROMPT)} chars; prompt with findings: {len(PROMPT_WITH_FINDINGS)} chars, ",
        end="",
    )
    print(f"{len(findings)} findings ({', '.join(sorted({f.kind for f in findings}))})")
    print(f"{'case':<62} {'per call':>12} {'':>16} {'throughput':>13}")
    _measure("redact: clean 500-char prompt, default settings", lambda: default.redact(CLEAN_PROMPT))
    _measure("redact: clean prompt, 100 known secrets", lambda: with_known.redact(CLEAN_PROMPT))
    _measure("redact: clean prompt, entropy + IP detectors on", lambda: everything.redact(CLEAN_PROMPT))
    _measure(
        f"redact: prompt with {len(findings)} findings, default settings",
        lambda: default.redact(PROMPT_WITH_FINDINGS),
    )
    _measure(
        f"redact_obj: XCom-like dict ({_count_strings(XCOM_VALUE)} strings incl. keys)",
        lambda: default.redact_obj(XCOM_VALUE),
    )
    _measure(
        "Redactor(settings, 100 known secrets): construction", lambda: Redactor(known_secrets=KNOWN_SECRETS)
    )


if __name__ == "__main__":
    main()
