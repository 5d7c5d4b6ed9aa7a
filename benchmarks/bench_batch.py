"""Batch LLM throughput: raw AsyncOpenAI vs LLMBatchOperator vs dynamically mapped LLMOperator tasks.

Against the fault-injecting fake server (tests/fakes/fault_server.py) in its own process, with a fixed
per-request latency and no faults, the same prompts are sent three ways, all measured in this run:

  (a) a raw ``AsyncOpenAI`` client at the given concurrency: the limit (no governance, no Airflow);
  (b) ``LLMBatchOperator`` with governance on (policy, budget ledger in blocks, redaction, audit,
      replay journal), run through ``dag.test()`` on a temporary Airflow home;
  (c) the same prompts as dynamically mapped ``LLMOperator`` tasks through ``dag.test()`` (each item
      pays for a task instance); at ``--mapped-items`` (default 100) because 1,000 mapped tasks take
      minutes on two cores.

Printed: calls/s of each, (b)/(a) (goal >= 0.90) and (b)/(c) (goal >= 30x). (b) is given twice: over
the whole ``dag.test()`` (Airflow's per-run cost included) and inside the task (the batch engine alone,
from its summary). Then a small honest figure against the real local model (SmolLM2-135M on CPU): raw
client vs LLMBatchOperator, ``--real-items`` prompts. Nothing is asserted.

    .venv/bin/python benchmarks/bench_batch.py [--items 1000] [--concurrency 8] [--latency-ms 50]
        [--mapped-items 100] [--real-items 16] [--no-real] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakes.fault_server import FaultConfig, FaultServerProcess  # noqa: E402

GOAL_VS_RAW = 0.90
GOAL_VS_MAPPED = 30.0
TEMPLATE = "Classify the sentiment of this ticket [key={{ item.id }}]: {{ item.text }}"

POLICY = """
version: 1
defaults: {redact_prompts: true, redact_outputs: true, store_content: false}
rules:
  - name: bench
    match: {dag_id: "bench_*"}
    models:
      - {connection: bench_llm, model: fake-model, max_tokens_per_call: 64}
      - {connection: bench_real, model: smollm2, max_tokens_per_call: 64}
budgets:
  - {name: bench-day, scope: global, period: day, max_tokens: 100000000}
"""

BATCH_DAG = """
import os
from datetime import datetime
from airflow.sdk import DAG
from governed_ai.operators.batch import LLMBatchOperator

for dag_id, conn, model, concurrency, max_tokens, items in [
    ("bench_batch", "bench_llm", "fake-model", os.environ["BENCH_CONCURRENCY"], 8, "BENCH_INPUT"),
    ("bench_batch_real", "bench_real", "smollm2", os.environ["BENCH_REAL_CONCURRENCY"], 16,
     "BENCH_REAL_INPUT"),
]:
    with DAG(dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
        LLMBatchOperator(
            task_id="classify",
            input_path=os.environ[items],
            key_field="id",
            prompt_template=os.environ["BENCH_TEMPLATE"],
            model=model,
            max_tokens=max_tokens,
            temperature=0.0,
            concurrency=int(concurrency),
            llm_conn_id=conn,
            progress_interval_seconds=5,
        )
    globals()[dag_id] = dag
"""

MAPPED_DAG = """
import json, os
from datetime import datetime
from airflow.sdk import DAG, task
from governed_ai.operators.llm import LLMOperator

PROMPTS = json.loads(os.environ["BENCH_PROMPTS_JSON"])[: int(os.environ["BENCH_MAPPED_ITEMS"])]

with DAG("bench_mapped", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as bench_mapped:
    @task
    def prompts():
        return PROMPTS

    LLMOperator.partial(task_id="classify", model="fake-model", max_tokens=8, llm_conn_id="bench_llm").expand(
        prompt=prompts()
    )

with DAG("bench_warmup", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as bench_warmup:
    @task
    def nothing():
        return 1

    nothing()
"""


def make_items(n: int) -> list[dict[str, str]]:
    moods = ("I love this, thank you!", "This is broken and I am angry.", "Works as described.")
    return [{"id": f"T{i:05d}", "text": f"{moods[i % 3]} Order {i}."} for i in range(n)]


def render(item: dict[str, str]) -> str:
    return TEMPLATE.replace("{{ item.id }}", item["id"]).replace("{{ item.text }}", item["text"])


def prepare_airflow(home: Path, items: list[dict[str, str]], args: argparse.Namespace) -> Path:
    """A private Airflow home, DAGs folder, policy and governance store; set before Airflow is imported."""
    dags = home / "dags"
    dags.mkdir(parents=True)
    (dags / "bench_batch_dags.py").write_text(BATCH_DAG)
    (dags / "bench_mapped_dags.py").write_text(MAPPED_DAG)
    (home / "policy.yaml").write_text(POLICY)
    # A JSONL input file, as a scheduled batch would read (a literal list in the DAG would also be
    # rendered by Airflow's templater, string by string, before the task starts).
    (home / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (home / "items_real.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items[: args.real_items]))
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__GOVERNED_AI__POLICY_PATH": str(home / "policy.yaml"),
            "AIRFLOW__GOVERNED_AI__STORE_URL": f"sqlite:///{home / 'governance.db'}",
            "BENCH_INPUT": str(home / "items.jsonl"),
            "BENCH_REAL_INPUT": str(home / "items_real.jsonl"),
            "BENCH_PROMPTS_JSON": json.dumps([render(i) for i in items]),
            "BENCH_TEMPLATE": TEMPLATE,
            "BENCH_CONCURRENCY": str(args.concurrency),
            "BENCH_REAL_CONCURRENCY": str(args.real_concurrency),
            "BENCH_MAPPED_ITEMS": str(args.mapped_items),
        }
    )
    return dags


async def raw_client(
    base_url: str, prompts: list[str], concurrency: int, model: str, max_tokens: int
) -> tuple[float, int]:
    """(a): seconds for all prompts through a bare AsyncOpenAI client, ``concurrency`` in flight, and the
    completion tokens they produced (temperature 0, as in (b))."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=120)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    completion_tokens = 0

    async def worker() -> None:
        nonlocal completion_tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            reply = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0.0,
            )
            completion_tokens += reply.usage.completion_tokens if reply.usage else 0

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    return elapsed, completion_tokens


def dag_test(dagbag: Any, dag_id: str) -> tuple[float, Any]:
    from airflow.utils.state import DagRunState

    dag = dagbag.dags[dag_id]
    started = time.perf_counter()
    run = dag.test()
    elapsed = time.perf_counter() - started
    if run.state != DagRunState.SUCCESS:
        raise SystemExit(f"{dag_id}: dag.test() ended {run.state}; see the log above")
    return elapsed, run


def batch_summary(run: Any) -> dict[str, Any]:
    from governed_ai.hooks.governance import GovernanceHook

    (record,) = GovernanceHook().governor.audit.query(
        action="batch.summary", dag_id=run.dag_id, run_id=run.run_id, limit=1
    )
    return dict(record.extra)


def line(label: str, calls: int, seconds: float, note: str = "") -> float:
    rate = calls / seconds
    print(f"  {label:<58} {calls:>5} calls {seconds:8.2f} s {rate:9.1f} calls/s {note}")
    return rate


def quiet_logs() -> None:
    """Task logs go to the console under dag.test(); keep only warnings so printing is not measured."""
    import logging

    for name in ("airflow", "httpx2", "httpx", "openai", "governed_ai", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--mapped-items", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="alternating (a)/(b) rounds; medians are used")
    parser.add_argument("--real-items", type=int, default=16)
    parser.add_argument("--real-concurrency", type=int, default=2)
    parser.add_argument("--no-real", action="store_true", help="skip the real local model")
    parser.add_argument("--only-real", action="store_true", help="only the real local model part")
    parser.add_argument("--verbose-logs", action="store_true", help="keep Airflow's INFO task logs")
    parser.add_argument("--profile", action="store_true", help="cProfile run (b) and print the top functions")
    args = parser.parse_args()

    items = make_items(args.items)
    prompts = [render(i) for i in items]
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as directory:
        home = Path(directory)
        prepare_airflow(home, items, args)
        config = FaultConfig(latency_ms=args.latency_ms, fault_rate=0.0)
        if args.only_real:
            from airflow.utils import db

            db.resetdb()
            quiet_logs()
            run_real(args, prompts[: args.real_items])
            return
        with FaultServerProcess(config) as server:
            os.environ["AIRFLOW_CONN_BENCH_LLM"] = server.connection_json(timeout=60)
            print(
                f"Fake server (own process): {args.latency_ms:.0f} ms per request, no faults; "
                f"{args.items} prompts; concurrency {args.concurrency}; {os.cpu_count()} CPUs"
            )
            run_fake(args, server, prompts, home)
        if not args.no_real:
            run_real(args, prompts[: args.real_items])


def run_fake(args: argparse.Namespace, server: FaultServerProcess, prompts: list[str], home: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db

    print("  (preparing a temporary Airflow database...)")
    db.resetdb()
    if not args.verbose_logs:
        quiet_logs()
    dagbag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if dagbag.import_errors:
        raise SystemExit(f"DAG import errors: {dagbag.import_errors}")
    dag_test(dagbag, "bench_warmup")  # Airflow's first-run cost in a process is not what is measured
    asyncio.run(raw_client(server.base_url, prompts[:50], args.concurrency, "fake-model", 8))  # warm-up

    # (a) and (b) alternate, so that load from elsewhere on a shared machine hits both alike.
    raw_rates: list[float] = []
    batch_rates: list[float] = []
    in_task_rates: list[float] = []
    profiler = None
    print()
    for round_number in range(1, args.rounds + 1):
        raw_s, _ = asyncio.run(raw_client(server.base_url, prompts, args.concurrency, "fake-model", 8))
        server.reset_stats()
        if args.profile and round_number == args.rounds:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        batch_s, batch_run = dag_test(dagbag, "bench_batch")
        if profiler is not None:
            profiler.disable()
        summary = batch_summary(batch_run)
        served = server.stats()["chat_requests"]
        if summary["ok"] != len(prompts) or served != len(prompts):
            raise SystemExit(f"(b) did not make exactly one call per item: {summary}, {served} requests")
        print(f"  round {round_number}:")
        raw_rates.append(line(f"(a) raw AsyncOpenAI, concurrency {args.concurrency}", len(prompts), raw_s))
        batch_rates.append(line("(b) LLMBatchOperator via dag.test() (whole run)", len(prompts), batch_s))
        in_task_rates.append(
            line("    the same, inside the task (engine summary)", summary["ok"], summary["seconds"])
        )

    mapped_s, _ = dag_test(dagbag, "bench_mapped")
    mapped_n = min(args.mapped_items, len(prompts))
    why = f"(at {mapped_n}: {len(prompts)} mapped tasks take too long on this machine)"
    mapped = line(
        f"(c) mapped LLMOperator via dag.test(), {mapped_n} tasks", mapped_n, mapped_s,
        "" if mapped_n == len(prompts) else why,
    )  # fmt: skip
    raw, batch, in_task = (statistics.median(r) for r in (raw_rates, batch_rates, in_task_rates))
    ceiling = args.concurrency / (args.latency_ms / 1000)
    print()
    print(
        f"  medians over {args.rounds} rounds: (a) {raw:.1f}, (b) {batch:.1f}, in task {in_task:.1f} calls/s"
    )
    print(f"  (b)/(a) whole run   = {batch / raw:5.2f}   (goal >= {GOAL_VS_RAW:.2f}); per round: "
          + ", ".join(f"{b / a:.2f}" for a, b in zip(raw_rates, batch_rates, strict=True)))  # fmt: skip
    print(f"  (b)/(a) inside task = {in_task / raw:5.2f}   per round: "
          + ", ".join(f"{b / a:.2f}" for a, b in zip(raw_rates, in_task_rates, strict=True)))  # fmt: skip
    print(f"  (b)/(c)             = {batch / mapped:5.1f}x  (goal >= {GOAL_VS_MAPPED:.0f}x)")
    print(
        f"  note: at concurrency {args.concurrency} and {args.latency_ms:.0f} ms the server allows at most "
        f"{ceiling:.0f} calls/s, so (b)/(c) cannot exceed {ceiling / mapped:.1f}x here"
    )
    if profiler is not None:
        import pstats

        print("\nProfile of the last (b), top 30 by cumulative time:")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        print("\nProfile of the last (b), top 30 by own time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def run_real(args: argparse.Namespace, prompts: list[str]) -> None:
    from airflow.dag_processing.dagbag import DagBag

    from governed_ai import local_model

    state_dir = Path(os.environ["AIRFLOW_HOME"]) / "local_model"
    print(
        f"\nReal local model (SmolLM2-135M, llama-cpp-python on CPU): {len(prompts)} prompts, max_tokens 16, "
        f"temperature 0, concurrency {args.real_concurrency}"
    )
    state = local_model.start(state_dir)
    raw_rates: list[float] = []
    batch_rates: list[float] = []
    try:
        os.environ["AIRFLOW_CONN_BENCH_REAL"] = local_model.connection_json(state.base_url)
        asyncio.run(raw_client(state.base_url, prompts[:2], 1, "smollm2", 16))  # warm-up
        dagbag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        dag_test(dagbag, "bench_warmup")  # Airflow's first-run cost in a process is not what is measured
        for round_number in range(1, args.rounds + 1):
            raw_s, raw_tokens = asyncio.run(
                raw_client(state.base_url, prompts, args.real_concurrency, "smollm2", 16)
            )
            batch_s, run = dag_test(dagbag, "bench_batch_real")
            summary = batch_summary(run)
            print(f"  round {round_number}:")
            raw_rates.append(
                line("raw AsyncOpenAI", len(prompts), raw_s, f"({raw_tokens} completion tokens)")
            )
            batch_rates.append(line("LLMBatchOperator via dag.test()", len(prompts), batch_s))
            line("    the same, inside the task (engine summary)", summary["ok"], summary["seconds"])
    finally:
        local_model.stop(state_dir)
    raw, batch = statistics.median(raw_rates), statistics.median(batch_rates)
    print(
        f"  medians: raw {raw:.2f}, batch {batch:.2f} calls/s; batch/raw = {batch / raw:4.2f} "
        "(the model on two shared CPU cores is the limit, not the engine)"
    )


if __name__ == "__main__":
    main()
