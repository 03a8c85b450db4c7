"""`nbmeter analytics run [--day D ...] [--tenant SLUG]`: the analytics run, once.

Without --day it does what the collector's task does every few minutes: roll up each
tenant's finished days not yet rolled up, judge them, then judge silent meters. With
--day (repeatable, or --from/--to) it recomputes those days, for late data or a
backfill. Prints a JSON summary (days, meter-days, alarms raised and cleared per kind).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from datetime import date, timedelta

from storage import analytics
from storage.credentials import tenant_by_slug
from storage.pool import connected, create_pool


async def _run_async(args: argparse.Namespace, dsn: str) -> int:
    tenant_id = None
    if args.tenant is not None:
        async with connected(dsn, "finding the tenant") as conn:
            tenant = await tenant_by_slug(conn, args.tenant)
        if tenant is None:
            print(f"nbmeter: no tenant {args.tenant!r}", file=sys.stderr)
            return 1
        tenant_id = tenant[0]
    days: list[date] | None = list(args.day) if args.day else None
    if args.day_from is not None:
        last = args.day_to or args.day_from
        span = (last - args.day_from).days
        days = [*(days or []), *(args.day_from + timedelta(days=k) for k in range(span + 1))]
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        started = time.monotonic()
        report = await analytics.run(pool, days=days, tenant_id=tenant_id)
        seconds = time.monotonic() - started
    finally:
        await pool.close()
    if report.skipped:
        print("nbmeter: another analytics run holds the lock; try again", file=sys.stderr)
        return 1
    summary = {
        "days": [[t, d.isoformat()] for t, d in report.days],
        "meter_days": report.meter_days,
        "raised": report.raised,
        "cleared": report.cleared,
        "silent": report.silent,
        "seconds": round(seconds, 3),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from nbmeter.commands._env import run_on_database

    return run_on_database(functools.partial(_run_async, args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter analytics`."""
    parser.add_argument("action", choices=["run"])
    parser.add_argument("--tenant", help="tenant slug (default: every tenant)")
    parser.add_argument(
        "--day", action="append", type=date.fromisoformat, help="a local day to recompute"
    )
    parser.add_argument("--from", dest="day_from", type=date.fromisoformat, help="first day")
    parser.add_argument("--to", dest="day_to", type=date.fromisoformat, help="last day")
    parser.set_defaults(func=_run)
