"""`nbmeter db migrate|status`: apply the schema migrations, or say which are pending."""

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
        else:
            names = asyncio.run(migrate.current(database_url()))
            pending = [m.name for m in migrate.available() if m.name not in names]
            print(f"applied: {len(names)}; pending: {', '.join(pending) or 'none'}")
    except StorageError as exc:
        print(f"nbmeter: {exc}", file=sys.stderr)
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter db`."""
    parser.add_argument("action", choices=["migrate", "status"])
    parser.set_defaults(func=_run)
