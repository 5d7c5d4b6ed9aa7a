"""False positives of the redactor's secret detectors, and its cost per prompt, with and without the
random-token detector (keyword-less secrets such as an AWS secret access key in a sentence).

Run: ``.venv/bin/python benchmarks/bench_redaction_fp.py``. Prints figures; asserts nothing.

Corpora (all offline, nothing downloaded):

- **example data**: every text in ``example_dags/data/**`` (JSON values, JSONL records, Markdown
  paragraphs) and the example policy's lines;
- **project ids**: what the provider itself writes into prompts, XCom, audit and journal: SHA-256 content
  hashes, chunk ids, prompt version ids, batch item hashes (24 hex), journal keys (64 hex), keyed digests,
  audit chain hashes, UUIDs, and base64 of example records, each alone and inside a sentence;
- **ordinary text**: the Python language reference shipped with CPython (``pydoc_data.topics``), the
  license texts of the installed distributions, and their README long descriptions (``METADATA``: real
  technical prose with code, URLs, commands and version strings), split into paragraphs.

A text counts as a false positive when the redactor reports a ``SECRET`` in it. The ordinary-text corpora
may hold a few real example credentials (README examples of API keys); the flagged tokens are printed so a
reader can judge them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import json
import re
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from governed_ai.core.keys import DeploymentKey, keyed_digest
from governed_ai.core.prompt_version import prompt_version
from governed_ai.core.redaction import RedactionSettings, Redactor
from governed_ai.core.retrieval.documents import chunk_id

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_redaction import CLEAN_PROMPT, PROMPT_WITH_FINDINGS  # noqa: E402

_PARAGRAPH = re.compile(r"\n\s*\n")


def _strings(value: object) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def example_data() -> list[str]:
    texts: list[str] = []
    for path in sorted((REPO / "example_dags" / "data").rglob("*")):
        if not path.is_file():
            continue
        content = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            texts.extend(_strings(json.loads(content)))
        elif path.suffix == ".jsonl":
            for line in content.splitlines():
                if line.strip():
                    texts.append(line)  # the raw record, as a batch prompt may quote it
                    texts.extend(_strings(json.loads(line)))
        else:
            texts.extend(p for p in _PARAGRAPH.split(content) if p.strip())
    for policy in sorted((REPO / "example_dags" / "policies").glob("*.yaml")):
        texts.extend(line for line in policy.read_text(encoding="utf-8").splitlines() if line.strip())
    return [t for t in texts if t.strip()]


def project_ids(example_texts: list[str]) -> list[str]:
    key = DeploymentKey.from_text(secrets.token_hex(32), source="bench")
    ids: list[str] = []
    for i, text in enumerate(example_texts[:200]):
        digest = hashlib.sha256(text.encode()).hexdigest()
        ids += [
            digest,
            chunk_id(f"knowledge_base/doc{i}.md", text),
            prompt_version(text, name="triage", version=f"v{i % 7}").id,
            digest[:24],
            keyed_digest(key, "batch-item-key", text),
            str(uuid.uuid4()),
            uuid.uuid4().hex,
            base64.b64encode(text.encode()).decode(),
            base64.urlsafe_b64encode(text.encode()).decode(),
        ]
    return ids + [f"Stored as {value} in the audit trail." for value in ids]


def ordinary_text() -> dict[str, list[str]]:
    import pydoc_data.topics as topics

    reference = [p for text in topics.topics.values() for p in _PARAGRAPH.split(text) if p.strip()]
    licenses: list[str] = []
    readmes: list[str] = []
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            name = file.name.upper()
            if name.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE")):
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    licenses.extend(p for p in _PARAGRAPH.split(file.read_text()) if p.strip())
        description = dist.metadata.get_payload() if dist.metadata else ""  # type: ignore[attr-defined]
        if isinstance(description, str):
            readmes.extend(p for p in _PARAGRAPH.split(description) if p.strip())
    return {
        "Python language reference (pydoc_data)": reference,
        "license texts of installed packages": licenses,
        "READMEs of installed packages (METADATA)": readmes,
    }


def secret_findings(redactor: Redactor, text: str) -> list[tuple[str, str]]:
    result = redactor.redact(text)
    return [(text[f.start : f.end], f.detector) for f in result.findings if f.kind == "SECRET"]


def report(label: str, texts: list[str], before: Redactor, after: Redactor) -> None:
    flagged_before = [t for t in texts if secret_findings(before, t)]
    new: list[tuple[str, str]] = []
    flagged_after = 0
    for text in texts:
        found = secret_findings(after, text)
        if found:
            flagged_after += 1
            new += [(value, detector) for value, detector in found if detector == "random-token"]
    n = len(texts)
    print(
        f"{label:<44} {n:>7} texts   SECRET in {len(flagged_before):>4} ({len(flagged_before) / n:7.3%}) "
        f"before   {flagged_after:>4} ({flagged_after / n:7.3%}) after   random-token hits: {len(new)}"
    )
    for value, _ in new[:8]:
        print(f"    random-token flagged: {value[:60]!r} ({len(value)} chars)")


def per_text_cost(redactor: Redactor, texts: list[str]) -> float:
    """Mean seconds per text over the best of 5 passes."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for text in texts:
            redactor.redact(text)
        best = min(best, time.perf_counter() - start)
    return best / len(texts)


def measure(label: str, func: Callable[[], object]) -> float:
    number, rounds = 2000, []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(number):
            func()
        rounds.append((time.perf_counter() - start) / number)
    return statistics.median(rounds)


CANARIES = {
    "AWS secret in prose": "the matching secret is wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY, keep it safe",
    "AWS secret quoted": 'secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"',
    "AWS secret, a random one": f"use {base64.b64encode(secrets.token_bytes(30)).decode()} for the bucket",
    "AWS key id": "key id AKIAIOSFODNN7EXAMPLE",
}


def main() -> None:
    before = Redactor(RedactionSettings(random_tokens=False))
    after = Redactor()
    examples = example_data()
    corpora = {
        "example data (example_dags/data, policies)": examples,
        "project ids (hashes, chunk ids, versions...)": project_ids(examples),
        **ordinary_text(),
    }
    print("False positives: texts with a SECRET finding, before/after the random-token detector")
    for label, texts in corpora.items():
        report(label, texts, before, after)
    everything = [t for texts in corpora.values() for t in texts]
    print(f"total texts: {len(everything):,}, {sum(map(len, everything)) / 1e6:.1f} M characters")

    print("\nCanaries (must be caught after):")
    for label, text in CANARIES.items():
        print(f"  {label:<32} before: {before.redact(text).text!r}")
        print(f"  {'':<32} after:  {after.redact(text).text!r}")

    print("\nCost per prompt (median of 7 rounds):")
    for label, text in (
        ("clean 500-char prompt", CLEAN_PROMPT),
        ("prompt with 9 findings", PROMPT_WITH_FINDINGS),
    ):
        b, a = measure(label, lambda t=text: before.redact(t)), measure(label, lambda t=text: after.redact(t))
        print(f"  {label:<34} before {b * 1e6:7.1f} us   after {a * 1e6:7.1f} us   ({(a - b) * 1e6:+.1f} us)")
    readmes = corpora["READMEs of installed packages (METADATA)"][:3000]
    b, a = per_text_cost(before, readmes), per_text_cost(after, readmes)
    mean_chars = sum(map(len, readmes)) / len(readmes)
    print(
        f"  {'README paragraphs (mean ' + str(round(mean_chars)) + ' chars)':<34} before {b * 1e6:7.1f} us   "
        f"after {a * 1e6:7.1f} us   ({(a - b) * 1e6:+.1f} us)"
    )


if __name__ == "__main__":
    main()
