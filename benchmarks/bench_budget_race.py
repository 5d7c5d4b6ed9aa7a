"""Budget utilisation of batches racing on one daily token budget.

Two (or ``--batches``) LLMBatchOperator tasks, each in its own process, share one global daily budget on
the same governance store (SQLite, or a throwaway PostgreSQL with ``--postgres``), against the fake server
in its own process, which counts the tokens it served. Printed per round and as medians: how much of the
budget was spent before the batches stopped, whether the ledger ever went over the limit, whether anything
is still held, and whether the ledger equals what the server served. Block sizes can be compared.

    .venv/bin/python benchmarks/bench_budget_race.py [--limit 3000] [--rounds 3] [--block-sizes 1,16]
        [--batches 2] [--postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakes.fault_server import FaultConfig, FaultServerProcess  # noqa: E402
from tests.reliability.support import DAG_ID, policy  # noqa: E402


def one_round(
    store_url: str, server: FaultServerProcess, home: Path, args: argparse.Namespace, block: int
) -> dict:
    from governed_ai.core.ledger import BudgetLedger
    from governed_ai.core.sqlstore import create_store_engine

    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(home / "airflow"),
        AIRFLOW__GOVERNED_AI__POLICY_PATH=str(home / "policy.yaml"),
        AIRFLOW__GOVERNED_AI__STORE_URL=store_url,
        AIRFLOW_CONN_TEST_LLM=server.connection_json(timeout=10),
    )
    server.reset_stats()
    started = time.perf_counter()
    processes = []
    for number in range(args.batches):
        spec = {
            "items": args.items,
            "concurrency": 4,
            "try_number": 1,
            "dag_id": f"{DAG_ID}_{number}",
            "item_prefix": f"b{number}-item",
            "budget_block_size": block,
            "on_budget_exhausted": "succeed",
            "xcom_path": str(home / f"x{number}.json"),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.batch_task_process", json.dumps(spec)],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    for process in processes:
        _, err = process.communicate(timeout=900)
        if process.returncode:
            raise SystemExit(err.decode()[-3000:])
    seconds = time.perf_counter() - started
    engine = create_store_engine(store_url)
    (status,) = BudgetLedger(engine).status()
    engine.dispose()
    served = sum(server.stats()["tokens"].values())
    ok = [json.loads((home / f"x{n}.json").read_text())["summary"]["ok"] for n in range(args.batches)]
    return {
        "used": status.spent_tokens / args.limit,
        "spent": status.spent_tokens,
        "held": status.reserved_tokens,
        "served": served,
        "ok": ok,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=3_000)
    parser.add_argument("--items", type=int, default=200, help="items per batch (together more than fits)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block-sizes", default="1,16")
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL instead of SQLite")
    args = parser.parse_args()
    blocks = [int(b) for b in args.block_sizes.split(",")]

    pg = None
    if args.postgres:
        from tests.pg_server import start_postgres

        pg = start_postgres()
    try:
        with FaultServerProcess(FaultConfig(latency_ms=10)) as server, tempfile.TemporaryDirectory() as tmp:
            print(
                f"{args.batches} batches x {args.items} items racing on a {args.limit:,}-token daily budget, "
                f"{'PostgreSQL' if pg else 'SQLite'}, fake server 10 ms/request, {args.rounds} round(s)"
            )
            results: dict[int, list[dict]] = {block: [] for block in blocks}
            for round_number in range(1, args.rounds + 1):
                for block in blocks:  # interleaved: load elsewhere hits every block size alike
                    home = Path(tmp) / f"r{round_number}-b{block}"
                    home.mkdir()
                    (home / "policy.yaml").write_text(policy(budget_tokens=args.limit))
                    store = (
                        pg.create_database(f"race_{round_number}_{block}") if pg else f"sqlite:///{home}/g.db"
                    )
                    r = one_round(store, server, home, args, block)
                    results[block].append(r)
                    print(
                        f"  round {round_number} block {block:>3}: {r['used']:6.1%} of the budget spent "
                        f"({r['spent']:,} tokens; items ok per batch {r['ok']}), held {r['held']}, "
                        f"server served {r['served']:,}, {r['seconds']:.1f} s"
                    )
            print()
            for block, runs in results.items():
                used = [r["used"] for r in runs]
                over = any(r["spent"] > args.limit for r in runs)
                equal = all(r["spent"] == r["served"] for r in runs)
                print(
                    f"  block {block:>3}: median {statistics.median(used):.1%} used "
                    f"(min {min(used):.1%}, max {max(used):.1%}); "
                    f"over the limit: {'YES' if over else 'never'}; ledger == served: "
                    f"{'always' if equal else 'NO'}"
                )
    finally:
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    main()
