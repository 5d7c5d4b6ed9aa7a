"""Batch LLM throughput, CPU and memory: the governed LLMBatchOperator against the raw openai SDK.

Against the fault-injecting fake server (tests/fakes/fault_server.py) in its own process, with a fixed
per-request latency and no faults, the same prompts with structured output (a pydantic model, the
server answering JSON that fits its schema) are sent by, each in a fresh process of its own:

  raw        a bare ``AsyncOpenAI`` (default HTTP client) at the given concurrency, replies parsed into
             the pydantic model, results written to a JSONL file at the end: the baseline;
  raw-aio    the same with the SDK's aiohttp client (``DefaultAioHttpClient``), the transport the
             provider uses: the fairer baseline;
  governed   ``LLMBatchOperator.execute`` with its defaults and governance fully on (policy, budget
             ledger, redaction of prompts and replies, hash-chained keyed audit trail, replay journal,
             SQLite store), results and failures streamed to files, as a scheduled task runs it; by
             default (``processes="auto"``) in one process per core where the batch has 250 items and
             32 calls in flight per process (here: 2 processes at concurrency 64), ``concurrency`` calls
             in flight between them;
  governed-pN  the same with ``processes=N`` (``--processes``, default 1: the one-process figure).

Sizes (``--sizes``, default 1,000 and 10,000 prompts) x concurrencies (``--concurrency``, default 8, 32,
64) x contenders, in ``--rounds`` rounds; within a round the contenders run in rotating order, so load
from elsewhere on a shared machine hits them alike. Printed per cell: median calls/s with its spread
(min-max), CPU per call (user+system of the process and its children, all threads) and peak RSS; then the
governed/raw ratios, and peak RSS at the largest size over the smallest for each contender. Finally
(``--mapped-items``, default 100) the same prompts as dynamically mapped ``LLMOperator`` tasks through
``dag.test()``, against the governed batch of the same prompts. Nothing is asserted.

    .venv/bin/python benchmarks/bench_batch.py [--sizes 1000,10000] [--concurrency 8,32,64]
        [--rounds 3] [--latency-ms 50] [--processes 2] [--mapped-items 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEMPLATE = "Classify the sentiment of this ticket [key={{ item.id }}]: {{ item.text }}"
POLICY = """
version: 1
defaults: {redact_prompts: true, redact_outputs: true, store_content: false}
rules:
  - name: bench
    match: {dag_id: "*"}
    models:
      - {connection: test_llm, model: fake-model, max_tokens_per_call: 64}
budgets:
  - {name: bench-day, scope: global, period: day, max_tokens: 1000000000}
"""


def make_items(n: int) -> list[dict[str, str]]:
    moods = ("I love this, thank you!", "This is broken and I am angry.", "Works as described.")
    return [{"id": f"T{i:06d}", "text": f"{moods[i % 3]} Order {i}."} for i in range(n)]


def render(item: dict[str, str]) -> str:
    return TEMPLATE.replace("{{ item.id }}", item["id"]).replace("{{ item.text }}", item["text"])


# -- the contenders, each run in a child process (``--child``) --------------------------------------------


def _label_model() -> Any:
    from typing import Literal

    from pydantic import BaseModel

    class TicketLabel(BaseModel):
        sentiment: Literal["positive", "negative", "neutral"]
        urgent: bool

    return TicketLabel


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # kB on Linux


async def _raw(args: argparse.Namespace, items: list[dict[str, str]], out: Path) -> int:
    import openai

    label = _label_model()
    http = openai.DefaultAioHttpClient() if args.child == "raw-aio" else None
    client = openai.AsyncOpenAI(
        base_url=args.base_url, api_key="bench", max_retries=3, timeout=60, http_client=http
    )
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "TicketLabel", "schema": label.model_json_schema(), "strict": False},
    }
    queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    results: list[dict[str, Any]] = []

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            reply = await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": render(item)}],
                max_tokens=64,
                temperature=0.0,
                response_format=response_format,  # type: ignore[arg-type]
            )
            parsed = label.model_validate_json(reply.choices[0].message.content or "")
            results.append({"key": item["id"], "output": parsed.model_dump(mode="json")})

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    await client.close()
    with out.open("w") as handle:
        for row in results:
            handle.write(json.dumps(row) + "\n")
    return len(results)


def _governed(args: argparse.Namespace, input_path: Path, out: Path) -> tuple[int, int]:
    """Calls answered, and processes the batch ran in."""
    from governed_ai.operators.batch import LLMBatchOperator
    from tests.reliability.support import task_context

    operator = LLMBatchOperator(
        task_id="classify",
        input_path=str(input_path),
        key_field="id",
        prompt_template=TEMPLATE,
        model="fake-model",
        max_tokens=64,
        temperature=0.0,
        output_schema=_label_model(),
        concurrency=args.concurrency,
        processes=args.processes or "auto",
        output_path=str(out),
        llm_conn_id="test_llm",
        progress_interval_seconds=3600,
    )
    xcom = operator.execute(task_context(dag_id="bench_batch"))  # type: ignore[arg-type]
    summary = xcom["summary"]
    if summary["ok"] != summary["total"]:
        raise SystemExit(f"governed batch did not answer every item: {summary}")
    return int(summary["ok"]), int(summary.get("processes", 1))


def child_main(args: argparse.Namespace) -> None:
    """One contender run; prints one JSON line: calls, seconds, cpu_s, rss_mb."""
    import logging

    logging.disable(logging.INFO)
    workdir = Path(args.workdir)
    input_path = workdir / "items.jsonl"
    items = make_items(args.items)
    if args.child == "governed":
        input_path.write_text("".join(json.dumps(item) + "\n" for item in items))
    out = workdir / "results.jsonl"
    # Imports are not what is measured (a worker has them loaded before the task starts).
    import openai  # noqa: F401

    if args.child == "governed":
        import governed_ai.operators.batch  # noqa: F401
        import tests.reliability.support  # noqa: F401
    cpu0, started = _cpu_seconds(), time.perf_counter()
    if args.child in ("raw", "raw-aio"):
        calls, processes = asyncio.run(_raw(args, items, out)), 1
    else:
        calls, processes = _governed(args, input_path, out)
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu0
    figures = {"calls": calls, "seconds": seconds, "cpu_s": cpu, "rss_mb": _peak_rss_mb()}
    print(json.dumps({**figures, "processes": processes}))


# -- the parent: schedules the runs and prints the table ----------------------------------------------


def run_child(kind: str, size: int, concurrency: int, base_url: str, processes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-batch-run-") as directory:
        home = Path(directory)
        (home / "policy.yaml").write_text(POLICY)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            {
                "AIRFLOW_HOME": str(home / "airflow"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__GOVERNED_AI__POLICY_PATH": str(home / "policy.yaml"),
                "AIRFLOW__GOVERNED_AI__STORE_URL": f"sqlite:///{home / 'governance.db'}",
                "AIRFLOW_CONN_TEST_LLM": json.dumps(
                    {"conn_type": "governed_ai_llm", "host": base_url, "extra": {"max_retries": 3}}
                ),
                "PYTHONPATH": str(REPO),
            }
        )
        command = [
            sys.executable, __file__, "--child", "governed" if kind.startswith("governed") else kind,
            "--items", str(size), "--concurrency", str(concurrency), "--base-url", base_url,
            "--workdir", str(home), "--processes", str(processes if kind.startswith("governed-p") else 0),
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def mapped_rate(base_url: str, count: int) -> tuple[float, float]:
    """(mapped LLMOperator calls/s, LLMBatchOperator calls/s) for ``count`` prompts, both via dag.test()."""
    # dag.test() on Airflow 3.3 needs DAGs parsed from a file (DagBag), not defined in the calling script.
    dag_file = r"""
import json, os
from datetime import datetime
from airflow.sdk import DAG, task
from governed_ai.operators.batch import LLMBatchOperator
from governed_ai.operators.llm import LLMOperator
prompts = json.loads(os.environ["BENCH_PROMPTS"])
with DAG("bench_mapped", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as mapped:
    @task
    def inputs():
        return prompts
    LLMOperator.partial(task_id="classify", model="fake-model", max_tokens=64, llm_conn_id="test_llm").expand(
        prompt=inputs()
    )
with DAG("bench_batch", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as batch:
    LLMBatchOperator(task_id="classify", items=[{"id": str(i), "p": p} for i, p in enumerate(prompts)],
                     key_field="id", prompt_template="{{ item.p }}", model="fake-model", max_tokens=64,
                     concurrency=8, llm_conn_id="test_llm")
with DAG("bench_warmup", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as warmup:
    @task
    def nothing():
        return 1
    nothing()
"""
    script = r"""
import json, os, sys, time, logging
sys.path.insert(0, os.environ["BENCH_REPO"])
logging.disable(logging.WARNING)
from airflow.utils import db
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:  # Airflow < 3.2
    from airflow.models.dagbag import DagBag
db.resetdb()
bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
bag.dags["bench_warmup"].test()
rates = []
for dag_id in ("bench_mapped", "bench_batch"):
    started = time.perf_counter()
    run = bag.dags[dag_id].test()
    assert str(run.state) == "success", run.state
    rates.append(len(json.loads(os.environ["BENCH_PROMPTS"])) / (time.perf_counter() - started))
print(json.dumps(rates))
"""
    with tempfile.TemporaryDirectory(prefix="bench-batch-mapped-") as directory:
        home = Path(directory)
        (home / "policy.yaml").write_text(POLICY)
        (home / "dags").mkdir()
        (home / "dags" / "bench_dags.py").write_text(dag_file)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            {
                "AIRFLOW_HOME": str(home / "airflow"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
                "AIRFLOW__GOVERNED_AI__POLICY_PATH": str(home / "policy.yaml"),
                "AIRFLOW__GOVERNED_AI__STORE_URL": f"sqlite:///{home / 'governance.db'}",
                "AIRFLOW_CONN_TEST_LLM": json.dumps({"conn_type": "governed_ai_llm", "host": base_url}),
                "BENCH_PROMPTS": json.dumps([render(item) for item in make_items(count)]),
                "BENCH_REPO": str(REPO),
            }
        )
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=3600, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"mapped run failed:\n{done.stderr[-3000:]}")
        mapped, batch = json.loads(done.stdout.strip().splitlines()[-1])
        return float(mapped), float(batch)


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--concurrency", default="8,32,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--processes", type=int, default=1, help="also governed-pN (0: none)")
    parser.add_argument("--mapped-items", type=int, default=100, help="0 skips the mapped comparison")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.concurrency = int(args.concurrency)
        child_main(args)
        return

    from tests.fakes.fault_server import FaultConfig, FaultServerProcess

    sizes = [int(s) for s in args.sizes.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    kinds = ["raw", "raw-aio", "governed"] + ([f"governed-p{args.processes}"] if args.processes > 0 else [])
    results: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    with FaultServerProcess(FaultConfig(latency_ms=args.latency_ms, fault_rate=0.0)) as server:
        print(
            f"Fake server (own process): {args.latency_ms:.0f} ms per request, no faults; structured output; "
            f"{os.cpu_count()} CPUs; sizes {sizes}; concurrency {concurrencies}; {args.rounds} rounds"
        )
        for round_number in range(args.rounds):
            for size in sizes:
                for concurrency in concurrencies:
                    shift = round_number % len(kinds)
                    for kind in kinds[shift:] + kinds[:shift]:  # a different contender goes first each round
                        run = run_child(kind, size, concurrency, server.base_url, args.processes)
                        results.setdefault((kind, size, concurrency), []).append(run)
                        print(
                            f"  round {round_number + 1} {kind:<12} {size:>6} prompts c={concurrency:<3} "
                            f"{run['calls'] / run['seconds']:7.1f} calls/s "
                            f"{run['cpu_s'] / run['calls'] * 1e6:6.0f} us CPU/call {run['rss_mb']:6.0f} MB "
                            f"in {run['processes']} process(es)",
                            flush=True,
                        )
        mapped = mapped_rate(server.base_url, args.mapped_items) if args.mapped_items else None

    print(
        "\nMedians (spread) over rounds; CPU per call is the process's user+system time (all threads and "
        "child processes) over its calls."
    )
    header = f"  {'contender':<12} {'prompts':>7} {'c':>3}  {'calls/s':<22} {'CPU us/call':<20} peak RSS MB"
    print(header)
    for size in sizes:
        for concurrency in concurrencies:
            for kind in kinds:
                runs = results[(kind, size, concurrency)]
                rates = [r["calls"] / r["seconds"] for r in runs]
                cpu = [r["cpu_s"] / r["calls"] * 1e6 for r in runs]
                rss = [r["rss_mb"] for r in runs]
                print(
                    f"  {kind:<12} {size:>7} {concurrency:>3}  {spread(rates, '.1f'):<22} "
                    f"{spread(cpu, '.0f'):<20} {spread(rss, '.0f')}"
                )
    print("\nGoverned against raw (medians of per-round ratios; goal: calls/s >= 1.0, CPU/call <= 1.0):")
    for size in sizes:
        for concurrency in concurrencies:
            for governed in [k for k in kinds if k.startswith("governed")]:
                for baseline in ("raw", "raw-aio"):
                    governed_runs = results[(governed, size, concurrency)]
                    baseline_runs = results[(baseline, size, concurrency)]
                    pairs = zip(governed_runs, baseline_runs, strict=True)
                    rate, cpu = [], []
                    for g, b in pairs:
                        rate.append((g["calls"] / g["seconds"]) / (b["calls"] / b["seconds"]))
                        cpu.append((g["cpu_s"] / g["calls"]) / (b["cpu_s"] / b["calls"]))
                    print(
                        f"  {size:>6} prompts c={concurrency:<3} {governed}/{baseline:<8} calls/s "
                        f"{spread(rate, '.2f'):<18} CPU/call {spread(cpu, '.2f')}"
                    )
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        print(f"\nPeak RSS at {large} prompts over {small} (goal for governed: <= 1.10):")
        for kind in kinds:
            for concurrency in concurrencies:
                big = statistics.median(r["rss_mb"] for r in results[(kind, large, concurrency)])
                little = statistics.median(r["rss_mb"] for r in results[(kind, small, concurrency)])
                print(f"  {kind:<12} c={concurrency:<3} {big:6.0f} / {little:6.0f} MB = {big / little:.3f}")
    if mapped is not None:
        mapped_calls, batch_calls = mapped
        print(
            f"\nThe same {args.mapped_items} prompts via dag.test(): mapped LLMOperator tasks "
            f"{mapped_calls:.1f} calls/s, LLMBatchOperator (c=8) {batch_calls:.1f} calls/s = "
            f"{batch_calls / mapped_calls:.1f}x "
            f"(at c=8 and {args.latency_ms:.0f} ms the server allows at most "
            f"{8 / (args.latency_ms / 1000):.0f} calls/s)"
        )


if __name__ == "__main__":
    main()
