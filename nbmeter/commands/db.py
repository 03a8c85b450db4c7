"""`nbmeter db migrate|status|retention`: apply the schema migrations, say which are
pending, or drop the raw-archive and quarantine chunks past their retention now (the
collector does it every hour itself; `--dry-run` lists them)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from nbmeter.commands._env import database_url


def _run(args: argparse.Namespace) -> int:
    from storage import migrate
    from storage.errors import StorageError

    try:
        if args.action == "migrate":
            applied = asyncio.run(migrate.migrate(database_url()))
            print(
                f"applied {len(applied)} migration(s)"
                + (": " + ", ".join(applied) if applied else " (schema current)")
            )
        elif args.action == "retention":
            return _retention(args)
        else:
            names = asyncio.run(migrate.current(database_url()))
            pending = [m.name for m in migrate.available() if m.name not in names]
            print(f"applied: {len(names)}; pending: {', '.join(pending) or 'none'}")
    except StorageError as exc:
        print(f"nbmeter: {exc}", file=sys.stderr)
        return 1
    return 0


def _retention(args: argparse.Namespace) -> int:
    from storage import retention

    try:
        policy = retention.Retention(args.raw_uplinks_days, args.quarantine_days)
        policy.tables()
    except ValueError as exc:
        print(f"nbmeter: {exc}", file=sys.stderr)
        return 2
    dropped = asyncio.run(retention.drop_expired_at(database_url(), policy, dry_run=args.dry_run))
    if dropped is None:
        print("another process is dropping expired chunks right now; nothing done")
        return 0
    verb = "would drop" if args.dry_run else "dropped"
    for table, chunks in dropped.items():
        print(
            f"{table}: {verb} {len(chunks)} chunk(s)" + (": " + ", ".join(chunks) if chunks else "")
        )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter db`."""
    from storage.retention import DEFAULT_DAYS

    parser.add_argument("action", choices=["migrate", "status", "retention"])
    parser.add_argument(
        "--raw-uplinks-days", type=int, default=DEFAULT_DAYS, help="retention: days kept"
    )
    parser.add_argument(
        "--quarantine-days", type=int, default=DEFAULT_DAYS, help="retention: days kept"
    )
    parser.add_argument("--dry-run", action="store_true", help="retention: only list")
    parser.set_defaults(func=_run)
