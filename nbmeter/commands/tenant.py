"""`nbmeter tenant`: tenants and their API keys (plaintext keys are printed once, to stdout).

nbmeter tenant create SLUG [--key-expires-in 90d]    a tenant and its first admin key
nbmeter tenant key create SLUG [--scope S]... [--expires-in 90d]
nbmeter tenant key list SLUG
nbmeter tenant key revoke SLUG KEY_ID                 refused at once by every API process
nbmeter tenant platform-secret SLUG PLATFORM          the push endpoint secret (onenet,
                                                      oceanconnect), shown once; rotates
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from storage.pool import Connection, Record, connected

_DURATION = re.compile(r"^([1-9][0-9]{0,5})([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
SCOPES = ("readings:read", "meters:write", "admin")


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m` or `2w` as a timedelta; argparse's error for anything else."""
    match = _DURATION.match(text.strip())
    if match is None:
        msg = f"{text!r} is not a duration: write a count and a unit m, h, d or w, e.g. 90d"
        raise argparse.ArgumentTypeError(msg)
    try:
        return timedelta(**{_UNITS[match[2]]: int(match[1])})
    except OverflowError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is too long a duration") from exc


def _expiry(expires_in: timedelta | None) -> datetime | None:
    return None if expires_in is None else datetime.now(UTC) + expires_in


async def _with_conn(dsn: str, work: Callable[[Connection], Awaitable[Any]]) -> Any:
    async with connected(dsn, "managing tenants and keys") as conn, conn.transaction():
        return await work(conn)


async def create(
    dsn: str, slug: str, name: str, timezone: str, expires_in: timedelta | None = None
) -> tuple[int, str]:
    """Create the tenant and an admin key in one transaction; (tenant_id, plaintext key)."""
    from storage.apikeys import create_api_key, create_tenant

    async def work(conn: Connection) -> tuple[int, str]:
        tenant_id = await create_tenant(conn, slug, name, timezone)
        return tenant_id, await create_api_key(conn, tenant_id, ["admin"], _expiry(expires_in))

    result: tuple[int, str] = await _with_conn(dsn, work)
    return result


def _print_key(key: str, scopes: list[str], expires_in: timedelta | None) -> None:
    until = _expiry(expires_in)
    ends = f"expires {until:%Y-%m-%dT%H:%M:%SZ}" if until else "never expires"
    print(f"API key {key.split('_')[1]} {','.join(scopes)}, {ends}", file=sys.stderr)
    print("the key is shown once, store it now:", file=sys.stderr)
    print(key)


async def _tenant_create(dsn: str, args: argparse.Namespace) -> None:
    tenant_id, key = await create(
        dsn, args.slug, args.name or args.slug, args.timezone, args.key_expires_in
    )
    print(f"tenant {args.slug} id={tenant_id}", file=sys.stderr)
    _print_key(key, ["admin"], args.key_expires_in)


async def _key_create(dsn: str, args: argparse.Namespace) -> None:
    from storage.apikeys import create_api_key, tenant_id_of

    scopes = sorted(set(args.scope or ["admin"]))

    async def work(conn: Connection) -> str:
        tenant_id = await tenant_id_of(conn, args.slug)
        return await create_api_key(conn, tenant_id, scopes, _expiry(args.expires_in))

    _print_key(await _with_conn(dsn, work), scopes, args.expires_in)


async def _key_list(dsn: str, args: argparse.Namespace) -> None:
    from storage.apikeys import list_api_keys, tenant_id_of

    async def work(conn: Connection) -> list[Record]:
        return await list_api_keys(conn, await tenant_id_of(conn, args.slug))

    now = datetime.now(UTC)
    for row in await _with_conn(dsn, work):
        if row["revoked_at"] is not None:
            state = f"revoked {row['revoked_at']:%Y-%m-%dT%H:%M:%SZ}"
        elif row["expires_at"] is not None:
            verb = "expired" if row["expires_at"] <= now else "expires"
            state = f"{verb} {row['expires_at']:%Y-%m-%dT%H:%M:%SZ}"
        else:
            state = "live"
        print(f"{row['key_id']}  {','.join(row['scopes']):<32}  {state}")


async def _key_revoke(dsn: str, args: argparse.Namespace) -> None:
    from storage.apikeys import revoke_api_key, tenant_id_of
    from storage.errors import StorageError

    async def work(conn: Connection) -> bool:
        return await revoke_api_key(conn, await tenant_id_of(conn, args.slug), args.key_id)

    if not await _with_conn(dsn, work):
        msg = f"tenant {args.slug} has no live API key {args.key_id}"
        raise StorageError(msg)
    print(f"API key {args.key_id} revoked", file=sys.stderr)


async def _platform_secret(dsn: str, args: argparse.Namespace) -> None:
    import os

    from devices.provision import ProvisionError, create_platform_secret

    key = os.environ.get("NBMETER_CREDENTIALS_KEY")
    if not key:
        msg = "set NBMETER_CREDENTIALS_KEY (eval $(nbmeter stack env))"
        raise ValueError(msg)
    try:
        secret = await create_platform_secret(dsn, args.slug, args.platform, credentials_key=key)
    except ProvisionError as exc:
        raise ValueError(str(exc)) from exc
    path = f"/p/{args.slug}/{args.platform}"
    if args.platform == "oceanconnect":
        path += f"/{secret}"
    print(f"{args.platform} endpoint of tenant {args.slug}: POST <base URL>{path}", file=sys.stderr)
    print("the secret is shown once (the platform's token), store it now:", file=sys.stderr)
    print(secret)


def _runner(action: Callable[[str, argparse.Namespace], Coroutine[Any, Any, None]]) -> Any:
    def run(args: argparse.Namespace) -> int:
        from nbmeter.commands._env import database_url
        from storage.errors import StorageError

        try:
            asyncio.run(action(database_url(), args))
        except (StorageError, ValueError) as exc:
            print(f"nbmeter: {exc}", file=sys.stderr)
            return 1
        return 0

    return run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Commands of `nbmeter tenant`."""
    actions = parser.add_subparsers(dest="action", required=True)
    p = actions.add_parser("create", help="a tenant and its first admin API key")
    p.add_argument("slug")
    p.add_argument("--name")
    p.add_argument("--timezone", default="Asia/Shanghai")
    p.add_argument(
        "--key-expires-in", type=parse_duration, help="the admin key expires after (e.g. 90d)"
    )
    p.set_defaults(func=_runner(_tenant_create))

    keys = actions.add_parser("key", help="API keys of a tenant").add_subparsers(
        dest="key_action", required=True
    )
    p = keys.add_parser("create", help="a new API key (printed once)")
    p.add_argument("slug")
    p.add_argument("--scope", action="append", choices=SCOPES, help="repeatable; default: admin")
    p.add_argument("--expires-in", type=parse_duration, help="e.g. 90d, 12h, 2w; default never")
    p.set_defaults(func=_runner(_key_create))
    p = keys.add_parser("list", help="key ids, scopes and states (never secrets)")
    p.add_argument("slug")
    p.set_defaults(func=_runner(_key_list))
    p = keys.add_parser("revoke", help="revoke a key: every API process refuses it at once")
    p.add_argument("slug")
    p.add_argument("key_id")
    p.set_defaults(func=_runner(_key_revoke))

    p = actions.add_parser(
        "platform-secret", help="create or rotate the tenant's push endpoint secret (shown once)"
    )
    p.add_argument("slug")
    p.add_argument("platform", choices=["onenet", "oceanconnect"])
    p.set_defaults(func=_runner(_platform_secret))
