"""`nbmeter command send|bulk|list|show|cancel|job --tenant SLUG`: the downlink mailbox.

The same storage calls as the API's /v1/.../commands routes: a command waits until its
meter is next heard from, and a running collector sends it in that window. `send` and
`bulk` take the command kind and `--arg name=value` (valve: action=open|close; clock:
none; reporting: interval_s=900 and/or report_time=02:30; rotate_key: optional key=aes
(the default for OMS meters) or key=oscore (the default for the others): the collector
stages the new AES key or OSCORE context); read: path=/3/0/9 (LwM2M clients only: an
LwM2M Read, the client's answer becomes the result). Commands record `cli:<user>`.
Output is JSON (`list`: one line per command).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import sys
from datetime import datetime
from typing import Any

from storage import mailbox
from storage.command_states import STATES
from storage.credentials import tenant_by_slug
from storage.errors import StorageError
from storage.pool import Connection, connected

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _json(value: Any) -> str:
    def plain(v: Any) -> Any:
        return v.isoformat() if isinstance(v, datetime) else str(v)

    return json.dumps(dataclasses.asdict(value), indent=2, default=plain)


def _ttl(text: str) -> int:
    """`90`, `90s`, `15m`, `12h` or `2d` as seconds."""
    unit = text[-1] if text[-1] in _UNITS else "s"
    number = text[:-1] if text[-1] in _UNITS else text
    if not number.isdigit() or int(number) <= 0:
        msg = f"{text!r}: write a positive number of s, m, h or d (e.g. 1d)"
        raise argparse.ArgumentTypeError(msg)
    return int(number) * _UNITS[unit]


def _arg(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        msg = f"{text!r}: write name=value"
        raise argparse.ArgumentTypeError(msg)
    return name, int(value) if value.isdigit() else value


async def _meter(conn: Connection, args: argparse.Namespace) -> int | None:
    if args.meter_id is not None:
        return int(args.meter_id)
    if args.address is None:
        print("nbmeter: give --meter-id or --address", file=sys.stderr)
        return None
    found = await mailbox.meter_of(conn, args.tenant, args.address)
    if found is None:
        print(f"nbmeter: no active meter {args.address!r} in {args.tenant}", file=sys.stderr)
    return found


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    if args.meter_ids:
        return {"meter_ids": [int(x) for x in args.meter_ids.split(",")]}
    if args.addresses:
        return {"addresses": args.addresses.split(",")}
    query = {"kind": args.meter_kind, "format": args.format, "address_prefix": args.prefix}
    return {"query": {k: v for k, v in query.items() if v is not None}}


async def _run_async(args: argparse.Namespace, dsn: str) -> int:
    async with connected(dsn, "the command mailbox") as conn:
        tenant = await tenant_by_slug(conn, args.tenant)
        if tenant is None:
            print(f"nbmeter: no tenant {args.tenant!r}", file=sys.stderr)
            return 1
        tenant_id, by = tenant[0], f"cli:{getpass.getuser()}"
        values = dict(args.arg or [])
        if args.action == "send":
            meter_id = await _meter(conn, args)
            if meter_id is None:
                return 1
            cmd, _ = await mailbox.create(
                conn,
                tenant_id=tenant_id,
                meter_id=meter_id,
                kind=args.what,
                args=values,
                ttl_s=args.ttl,
                created_by=by,
                idempotency_key=args.key,
            )
            print(_json(cmd))
        elif args.action == "bulk":
            job, _ = await mailbox.bulk(
                conn,
                tenant_id=tenant_id,
                kind=args.what,
                args=values,
                selection=_selection(args),
                ttl_s=args.ttl,
                created_by=by,
                idempotency_key=args.key,
            )
            print(_json(job))
        elif args.action == "list":
            meter_id = await _meter(conn, args) if args.address else args.meter_id
            for c in await mailbox.list_commands(
                conn,
                tenant_id,
                meter_id=meter_id,
                state=args.state,
                job_id=args.job,
                limit=args.limit,
            ):
                print(
                    f"{c.command_id}\tmeter={c.meter_id}\t{c.kind}\t{json.dumps(c.args)}\t"
                    f"{c.state}\tattempts={c.attempts}\t{c.reason or ''}"
                )
        else:
            return await _one(conn, args, tenant_id, by)
        return 0


async def _one(conn: Connection, args: argparse.Namespace, tenant_id: int, by: str) -> int:
    if args.id is None:
        print(f"nbmeter: command {args.action} needs an id", file=sys.stderr)
        return 2
    if args.action == "job":
        job = await mailbox.get_job(conn, tenant_id, args.id)
        if job is None:
            print(f"nbmeter: no command job {args.id} in {args.tenant}", file=sys.stderr)
            return 1
        print(_json(job))
        return 0
    if args.action == "cancel":
        cmd = await mailbox.cancel(conn, tenant_id, args.id, by)
    else:
        cmd = await mailbox.get(conn, tenant_id, args.id)
    if cmd is None:
        print(f"nbmeter: no command {args.id} in {args.tenant}", file=sys.stderr)
        return 1
    print(_json(cmd))
    return 0


def _run(args: argparse.Namespace) -> int:
    from nbmeter.commands._env import database_url

    if args.action in ("send", "bulk") and args.what is None:
        print(f"nbmeter: command {args.action} needs --kind", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run_async(args, database_url()))
    except mailbox.MailboxError as exc:
        print(f"nbmeter: {exc}", file=sys.stderr)
        return 1
    except (StorageError, OSError) as exc:
        print(f"nbmeter: {exc}", file=sys.stderr)
        return 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter command`."""
    parser.add_argument("action", choices=["send", "bulk", "list", "show", "cancel", "job"])
    parser.add_argument("id", nargs="?", type=int, help="show/cancel: command id; job: job id")
    parser.add_argument("--tenant", required=True, help="tenant slug")
    parser.add_argument(
        "--kind", dest="what", choices=["valve", "clock", "reporting", "rotate_key", "read"]
    )
    parser.add_argument(
        "--arg", action="append", type=_arg, help="name=value, e.g. action=close (repeatable)"
    )
    parser.add_argument("--ttl", type=_ttl, default=86_400, help="expires after (1d, 12h...)")
    parser.add_argument("--key", help="idempotency key: the same key again returns the same")
    parser.add_argument("--meter-id", type=int)
    parser.add_argument("--address", help="the tenant's meter address")
    parser.add_argument("--meter-ids", help="bulk: comma-separated meter ids")
    parser.add_argument("--addresses", help="bulk: comma-separated addresses")
    parser.add_argument("--meter-kind", choices=["water", "gas"], help="bulk query: kind")
    parser.add_argument("--format", help="bulk query: meter format, e.g. cjt188")
    parser.add_argument("--prefix", help="bulk query: address prefix")
    parser.add_argument("--state", choices=STATES, help="list: only this state")
    parser.add_argument("--job", type=int, help="list: only this bulk job's commands")
    parser.add_argument("--limit", type=int, default=100, help="list: commands to print")
    parser.set_defaults(func=_run)
