"""`nbmeter quarantine list|show|redecode --tenant SLUG`: the quarantine from a terminal.

The same queries and the same re-decode queue as the API's /v1/quarantine routes: a
running collector carries re-decode jobs out. `list` prints one line per row (newest
first), `show` and `redecode` print JSON; `redecode --wait` waits for the job to finish
(exit 1 if it failed or did not finish in time). Jobs record `cli:<user>` as requester.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import json
import sys
import time
from dataclasses import asdict
from datetime import datetime
from typing import Any

from storage import quarantine, reasons
from storage.credentials import tenant_by_slug
from storage.pool import connected


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return value


def _record(row: quarantine.Quarantined | quarantine.Attempt | quarantine.Job) -> dict[str, Any]:
    return {k: _plain(v) for k, v in asdict(row).items()}


def _filter(args: argparse.Namespace, resolved: bool | None) -> quarantine.Filter:
    return quarantine.Filter(
        args.reason,
        args.error,
        args.meter_id,
        args.address,
        args.received_from,
        args.received_to,
        resolved,
    )


async def _run_async(args: argparse.Namespace, dsn: str) -> int:
    if args.action == "show" and args.id is None:
        print("nbmeter: quarantine show needs the row id", file=sys.stderr)
        return 2
    async with connected(dsn, "reading the quarantine") as conn:
        tenant = await tenant_by_slug(conn, args.tenant)
        if tenant is None:
            print(f"nbmeter: no tenant {args.tenant!r}", file=sys.stderr)
            return 1
        tenant_id = tenant[0]
        if args.action == "list":
            flt = _filter(args, False if args.open else None)
            rows = await quarantine.list_rows(conn, tenant_id, flt, after=None, limit=args.limit)
            for r in rows:
                print(
                    f"{r.quarantine_id}\t{r.received_at.isoformat()}\tmeter={r.meter_id}\t"
                    f"{r.reason}\t{r.resolution or 'open'}\t{r.detail[:80]}"
                )
            return 0
        if args.action == "show":
            row = await quarantine.get_row(conn, tenant_id, args.id)
            if row is None:
                print(f"nbmeter: no quarantine row {args.id} in {args.tenant}", file=sys.stderr)
                return 1
            out = _record(row)
            out["history"] = [
                _record(h) for h in await quarantine.history(conn, tenant_id, args.id)
            ]
            print(json.dumps(out, indent=2))
            return 0
        by = f"cli:{getpass.getuser()}"
        if args.id is not None:
            job = await quarantine.request_one(conn, tenant_id, args.id, by)
            if job is None:
                print(f"nbmeter: no quarantine row {args.id} in {args.tenant}", file=sys.stderr)
                return 1
        else:
            job = await quarantine.request_matching(conn, tenant_id, _filter(args, None), by)
        deadline = time.monotonic() + args.wait
        while job.state == "queued" and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            job = await quarantine.get_job(conn, tenant_id, job.job_id)
            assert job is not None
        print(json.dumps(_record(job), indent=2))
        return 0 if job.state == "done" or not args.wait else 1


def _run(args: argparse.Namespace) -> int:
    from nbmeter.commands._env import run_on_database

    return run_on_database(functools.partial(_run_async, args))


def _when(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        msg = f"{text!r} has no UTC offset: write e.g. 2025-01-01T00:00:00+00:00"
        raise ValueError(msg)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter quarantine`."""
    parser.add_argument("action", choices=["list", "show", "redecode"])
    parser.add_argument("id", nargs="?", type=int, help="show/redecode: the quarantine row id")
    parser.add_argument("--tenant", required=True, help="tenant slug")
    parser.add_argument("--reason", help=f"one of: {', '.join(reasons.Reason)}")
    parser.add_argument("--error", help="decoder error of undecodable rows, e.g. no_key")
    parser.add_argument("--meter-id", type=int)
    parser.add_argument("--address", help="the tenant's meter address")
    parser.add_argument("--from", dest="received_from", type=_when, help="received at or after")
    parser.add_argument("--to", dest="received_to", type=_when, help="received before")
    parser.add_argument("--open", action="store_true", help="list: only rows not resolved")
    parser.add_argument("--limit", type=int, default=50, help="list: rows to print")
    parser.add_argument(
        "--wait", type=float, default=0.0, help="redecode: seconds to wait for the job"
    )
    parser.set_defaults(func=_run)
