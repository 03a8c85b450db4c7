"""`nbmeter db migrate|status|retention|compact`: apply the schema migrations, say which
are pending, drop the raw-archive and quarantine chunks past their retention now, or
rebuild the indexes of closed readings chunks packed (the collector does both every hour
itself; `--dry-run` lists the chunks)."""

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
        elif args.action == "compact":
            return _compact(args)
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


def _compact(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from storage import compaction

    if args.after_hours < 0:
        print(
            f"nbmeter: --after-hours must not be negative (got {args.after_hours})", file=sys.stderr
        )
        return 2
    done = asyncio.run(
        compaction.compact_closed_at(
            database_url(),
            after=timedelta(hours=args.after_hours),
            limit=args.limit,
            dry_run=args.dry_run,
        )
    )
    if done is None:
        print("another process is compacting chunks right now; nothing done")
        return 0
    if not done:
        print("readings: no closed chunk left to compact")
    for c in done:
        if args.dry_run:
            print(f"readings: would compact {c.chunk} (indexes {c.index_bytes_before:,} B)")
        else:
            print(
                f"readings: compacted {c.chunk}: indexes {c.index_bytes_before:,} B ->"
                f" {c.index_bytes_after:,} B"
            )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter db`."""
    from storage.compaction import DEFAULT_AFTER
    from storage.retention import DEFAULT_DAYS

    parser.add_argument("action", choices=["migrate", "status", "retention", "compact"])
    parser.add_argument(
        "--raw-uplinks-days", type=int, default=DEFAULT_DAYS, help="retention: days kept"
    )
    parser.add_argument(
        "--quarantine-days", type=int, default=DEFAULT_DAYS, help="retention: days kept"
    )
    parser.add_argument(
        "--after-hours",
        type=float,
        default=DEFAULT_AFTER.total_seconds() / 3600,
        help="compact: a chunk whose day ended this long ago is closed",
    )
    parser.add_argument(
        "--limit", type=int, default=7, help="compact: at most this many chunks (oldest first)"
    )
    parser.add_argument("--dry-run", action="store_true", help="retention, compact: only list")
    parser.set_defaults(func=_run)
