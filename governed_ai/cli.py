"""``governed-ai``: write and check a policy, read and verify the audit trail, show budget status.

    governed-ai policy init [PATH] [--force]     # a commented starter policy (default under AIRFLOW_HOME)
    governed-ai policy check POLICY.yaml
    governed-ai audit tail [-n 20] | query [--dag-id ..] [--run-id ..] [--action ..] [--decision deny]
    governed-ai audit export FILE.jsonl [filters]
    governed-ai audit verify [--key-file F] [--anchor-path P] | anchor
    governed-ai budget status
    governed-ai cache status
    governed-ai cache purge [--older-than 7d] [--prompt-version V] [--all]

The store is ``--store-url``, else ``$AIRFLOW__GOVERNED_AI__STORE_URL``, else the SQLite file under
``$AIRFLOW_HOME/governed_ai/``: the same defaults the governance hook uses. Only ``audit verify`` and
``audit anchor`` import Airflow (when it is installed), to find the audit key and the anchor location the
way the tasks do; ``--key-file`` and ``--anchor-path`` override that.
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
from governed_ai.core.audit_anchors import AnchorLog
from governed_ai.core.keys import DeploymentKey, read_key_file
from governed_ai.core.ledger import BudgetLedger
from governed_ai.core.paths import default_store_url, provider_home
from governed_ai.core.policy import PolicyError, PolicyProvider, load_policy_file
from governed_ai.core.response_cache import ResponseCache, parse_age
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


def _key_and_anchors(args: argparse.Namespace) -> tuple[DeploymentKey | None, AnchorLog]:
    """The audit key and anchor location: the options, else what the governance hook would use (never
    creating a key: a new key could not verify anything), else the environment and default paths."""
    key: DeploymentKey | None = None
    anchors: AnchorLog | None = AnchorLog(args.anchor_path) if args.anchor_path else None
    if args.key_file:
        key = read_key_file(Path(args.key_file))
        if key is None:
            raise SystemExit(f"governed-ai: key file {args.key_file} does not exist")
    else:
        try:
            from governed_ai.hooks.governance import GovernanceHook
        except ImportError:  # Airflow is not installed here: read what the environment says
            configured = os.environ.get("AIRFLOW__GOVERNED_AI__AUDIT_HMAC_KEY")
            if configured:
                key = DeploymentKey.from_text(configured, source="AIRFLOW__GOVERNED_AI__AUDIT_HMAC_KEY")
            else:
                key = read_key_file(provider_home() / "audit.key")
        else:
            hook = GovernanceHook.for_deployment()
            key = hook.audit_key(create_dev_key=False)
            if anchors is None:
                anchors = hook.anchor_log()
    if anchors is None:
        anchors = AnchorLog(
            os.environ.get("AIRFLOW__GOVERNED_AI__AUDIT_ANCHOR_PATH") or provider_home() / "anchors"
        )
    return key, anchors


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
    verify = audit.add_parser(
        "verify", help="check the keyed hash chain and its anchors; exit 1 unless everything checks out"
    )
    anchor = audit.add_parser("anchor", help="copy the chain head to the anchor location now")
    for sub in (verify, anchor):
        sub.add_argument(
            "--key-file", default=None, help="file holding the audit key (default: as the tasks)"
        )
        sub.add_argument(
            "--anchor-path", default=None, help="anchor directory or URL (default: as the tasks)"
        )

    budget = groups.add_parser("budget").add_subparsers(dest="command", required=True)
    budget.add_parser("status", help="spend, holds and remaining per budget period")

    cache = groups.add_parser("cache").add_subparsers(dest="command", required=True)
    cache.add_parser("status", help="stored replies per scope and prompt version")
    purge = cache.add_parser("purge", help="delete stored replies by age and/or prompt version")
    purge.add_argument("--older-than", default=None, help="stored longer ago than this: 7d, 12h, 30m, 45s")
    purge.add_argument("--prompt-version", default=None, help="stored for this prompt version id")
    purge.add_argument("--all", action="store_true", help="every stored reply")

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

    if args.group == "cache":
        return _cache_command(args, ResponseCache(store_engine))

    if args.command in ("verify", "anchor"):
        key, anchors = _key_and_anchors(args)
        keyed = AuditStore(store_engine, key=key, anchors=anchors)
        if args.command == "anchor":
            if key is None:
                print("cannot anchor: no audit key is configured", file=sys.stderr)
                return 1
            written = keyed.anchor()
            print(f"anchored seq {written.seq} at {anchors.location}" if written else "nothing to anchor")
            return 0
        result = keyed.verify()
        print(json.dumps(result.model_dump(mode="json"), indent=2))
        if not result.ok:
            print(f"audit chain {result.status.upper()}: {result.problem}", file=sys.stderr)
        return 0 if result.ok else 1

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
    return 0


def _cache_command(args: argparse.Namespace, cache: ResponseCache) -> int:
    if args.command == "status":
        groups = cache.status()
        if not groups:
            print("the response cache is empty")
        for g in groups:
            entries = f"{g.entries} entr{'y' if g.entries == 1 else 'ies'}"
            stored = f"stored {g.oldest:%Y-%m-%dT%H:%MZ} .. {g.newest:%Y-%m-%dT%H:%MZ}"
            print(f"{g.scope} prompt_version={g.prompt_version or '-'}: {entries}, {stored}")
        return 0
    if not (args.older_than or args.prompt_version or args.all):
        print(
            "governed-ai cache purge: say what to delete: --older-than AGE, --prompt-version V "
            "(both: entries matching both), or --all",
            file=sys.stderr,
        )
        return 2
    if args.all and (args.older_than or args.prompt_version):
        print("governed-ai cache purge: --all deletes everything; drop it or the filters", file=sys.stderr)
        return 2
    try:
        older_than = parse_age(args.older_than) if args.older_than else None
    except ValueError as err:
        print(f"governed-ai cache purge: --older-than: {err}", file=sys.stderr)
        return 2
    deleted = cache.purge(older_than=older_than, prompt_version=args.prompt_version)
    print(f"purged {deleted} cached repl{'y' if deleted == 1 else 'ies'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
