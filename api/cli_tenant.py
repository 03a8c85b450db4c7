"""`nbmeter tenant create SLUG`: a tenant and its first admin API key (printed once)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg


async def create(dsn: str, slug: str, name: str, timezone: str) -> tuple[int, str]:
    """Create the tenant and an admin key in one transaction; (tenant_id, plaintext key)."""
    from storage.apikeys import create_api_key, create_tenant

    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            tenant_id = await create_tenant(conn, slug, name, timezone)
            key = await create_api_key(conn, tenant_id, ["admin"])
    finally:
        await conn.close()
    return tenant_id, key


def _run(args: argparse.Namespace) -> int:
    from nbmeter.cli import database_url
    from storage.errors import StorageError

    try:
        tenant_id, key = asyncio.run(
            create(database_url(), args.slug, args.name or args.slug, args.timezone)
        )
    except (StorageError, OSError, asyncpg.PostgresError) as exc:
        print(f"nbmeter: {exc}", file=sys.stderr)
        return 1
    print(f"tenant {args.slug} id={tenant_id}", file=sys.stderr)
    print("admin API key (shown once, store it now):", file=sys.stderr)
    print(key)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter tenant create`."""
    parser.add_argument("action", choices=["create"])
    parser.add_argument("slug")
    parser.add_argument("--name")
    parser.add_argument("--timezone", default="Asia/Shanghai")
    parser.set_defaults(func=_run)
