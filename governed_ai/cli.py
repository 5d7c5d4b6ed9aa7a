"""``governed-ai``: write and check a policy, read and verify the audit trail, show budget status.

    governed-ai policy init [PATH] [--force]     # a commented starter policy (default under AIRFLOW_HOME)
    governed-ai policy check POLICY.yaml
    governed-ai audit tail [-n 20] | query [--dag-id ..] [--run-id ..] [--action ..] [--decision deny]
    governed-ai audit export FILE.jsonl [filters] | verify
    governed-ai budget status

The store is ``--store-url``, else ``$AIRFLOW__GOVERNED_AI__STORE_URL``, else the SQLite file under
``$AIRFLOW_HOME/governed_ai/``: the same defaults the governance hook uses. Airflow itself is not imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from governed_ai.core.audit import AuditStore, StoredAuditRecord
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.paths import default_store_url, provider_home
from governed_ai.core.policy import PolicyError, PolicyProvider, load_policy_file
from governed_ai.core.sqlstore import create_store_engine

#: The policy ``governed-ai policy init`` writes: fail-closed, one rule, one daily budget, redaction on.
STARTER_POLICY = "starter_policy.yaml"


def starter_policy_text() -> str:
    return (resources.files("governed_ai.policies") / STARTER_POLICY).read_text(encoding="utf-8")


def default_policy_path() -> Path:
    return provider_home() / "governance_policy.yaml"


def init_policy(path: Path, *, force: bool = False) -> None:
    """Write the starter policy to ``path``; an existing file is kept unless ``force``."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; keep it, choose another path, or pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(starter_policy_text(), encoding="utf-8")


def _store_url(explicit: str | None) -> str:
    if explicit:
        return explicit
    return os.environ.get("AIRFLOW__GOVERNED_AI__STORE_URL") or default_store_url()


def _row(record: StoredAuditRecord) -> str:
    tokens = ""
    if record.prompt_tokens is not None or record.completion_tokens is not None:
        tokens = f" tokens={(record.prompt_tokens or 0) + (record.completion_tokens or 0)}"
    cost = f" cost=${record.cost_usd:.6f}" if record.cost_usd is not None else ""
    why = f" error={record.error!r}" if record.error else ""
    return (
        f"{record.seq:>6} {record.time:%Y-%m-%dT%H:%M:%SZ} {record.dag_id}/{record.task_id}"
        f"[{record.map_index}] {record.action} {record.resource or '-'} {record.decision} "
        f"rule={record.rule or '-'} {record.outcome}{tokens}{cost}{why}"
    )


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: getattr(args, key)
        for key in ("dag_id", "run_id", "task_id", "action", "decision")
        if getattr(args, key, None)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="governed-ai", description="Governance tools for governed_ai.")
    parser.add_argument("--store-url", default=None, help="SQLAlchemy URL of the audit/ledger store")
    groups = parser.add_subparsers(dest="group", required=True)

    policy = groups.add_parser("policy").add_subparsers(dest="command", required=True)
    init = policy.add_parser("init", help="write a commented, fail-closed starter policy")
    default_path = "$AIRFLOW_HOME/governed_ai/governance_policy.yaml"
    init.add_argument("path", type=Path, nargs="?", default=None, help=f"default: {default_path}")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    check = policy.add_parser("check", help="validate a policy file; exit 1 with line-numbered errors")
    check.add_argument("path", type=Path)

    audit = groups.add_parser("audit").add_subparsers(dest="command", required=True)
    tail = audit.add_parser("tail", help="the newest records")
    tail.add_argument("-n", type=int, default=20)
    for name in ("query", "export"):
        sub = audit.add_parser(name)
        if name == "export":
            sub.add_argument("file", type=Path)
        for flag in ("--dag-id", "--run-id", "--task-id", "--action", "--decision"):
            sub.add_argument(flag)
        if name == "query":
            sub.add_argument("--limit", type=int, default=100)
    audit.add_parser("verify", help="check the hash chain; exit 1 if a record was edited or removed")

    budget = groups.add_parser("budget").add_subparsers(dest="command", required=True)
    budget.add_parser("status", help="spend, holds and remaining per budget period")

    args = parser.parse_args(argv)

    if args.group == "policy" and args.command == "init":
        path = args.path or default_policy_path()
        try:
            init_policy(path, force=args.force)
        except FileExistsError as err:
            print(str(err), file=sys.stderr)
            return 1
        print(f"wrote {path}: edit the lines marked EDIT, then")
        print(f"  governed-ai policy check {path}")
        print(f"  export AIRFLOW__GOVERNED_AI__POLICY_PATH={path}")
        return 0

    if args.group == "policy":
        try:
            document = load_policy_file(args.path)
        except PolicyError as err:
            print(str(err), file=sys.stderr)
            return 1
        digest = PolicyProvider(args.path).engine().digest
        print(
            f"{args.path}: OK — {len(document.rules)} rule(s), {len(document.budgets)} budget(s), "
            f"digest {digest[:12]}"
        )
        return 0

    store_engine = create_store_engine(_store_url(args.store_url))
    if args.group == "budget":
        statuses = BudgetLedger(store_engine).status()
        if not statuses:
            print("no budget has been used yet")
        for s in statuses:
            tokens = (
                f"{s.spent_tokens:,}/{s.max_tokens:,} tokens"
                if s.max_tokens is not None
                else f"{s.spent_tokens:,} tokens"
            )
            cost = (
                f"${s.spent_cost_usd:.4f}/${s.max_cost_usd:.2f}"
                if s.max_cost_usd is not None
                else f"${s.spent_cost_usd:.4f}"
            )
            resets = f" resets {s.resets_at:%Y-%m-%dT%H:%MZ}" if s.resets_at else ""
            window = f"{s.period_kind or 'period'} {s.period}"
            held = f"reserved {s.reserved_tokens:,} tokens"
            print(f"{s.budget} [{window}]: {tokens}, {cost}; {held}{resets}")
        return 0

    store = AuditStore(store_engine)
    if args.command == "tail":
        for record in store.tail(args.n):
            print(_row(record))
    elif args.command == "query":
        for record in store.query(limit=args.limit, order="asc", **_filters(args)):
            print(_row(record))
    elif args.command == "export":
        with args.file.open("w") as out:
            count = store.export_jsonl(out, **_filters(args))
        print(f"exported {count} record(s) to {args.file}")
    else:
        result = store.verify()
        print(json.dumps(result.model_dump(mode="json"), indent=2))
        return 0 if result.ok else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
