"""The collector's batched OSCORE context lookup (`storage.credentials.load_oscore_many`)
now that a kid may be a pending context's (migration 0048), beside the lookup by current
kid only that it replaced.

    python bench/oscore_lookup.py [--meters 20000] [--pending 0.1] [--batch 64] [--rounds 300]

Needs NBMETER_DATABASE_URL (a scratch database is created, migrated and dropped). Stores
`--meters` sealed contexts, `--pending` of them with a context staged beside, then times
`--rounds` lookups of `--batch` kids each (as the loader asks: mostly current kids, a
pending kid where a meter has one, a few unknown kids), with the new query and with the
old one (current kids only, the SQL before 0048), alternating, and prints the median and
p95 milliseconds per lookup of each and their ratio. The lookup runs once per loader
batch, not per uplink; an uplink's own path gains no query unless it confirms a context.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable

import asyncpg
from benchkit import drop_database, scratch_database

from storage import credentials

_OLD = (  # storage.credentials.load_oscore_many before migration 0048
    "SELECT c.oscore_kid, c.meter_id, c.tenant_id, m.address, c.oscore_sender_id,"
    " c.oscore_sealed, c.oscore_replay_index, c.oscore_replay_bits"
    " FROM device_credentials c JOIN meters m USING (meter_id)"
    " WHERE c.oscore_kid = ANY($1::bytea[]) AND m.removed_at IS NULL"
)


async def _fill(conn: asyncpg.Connection, key: bytes, meters: int, pending: float) -> list[bytes]:
    """Meters with sealed contexts; a share with a pending one. Returns the kids to ask."""
    tenant = await conn.fetchval(
        "INSERT INTO tenants (slug, name) VALUES ('bench', 'bench') RETURNING tenant_id"
    )
    ids = await conn.fetch(
        "INSERT INTO meters (tenant_id, address, kind, format) SELECT $1,"
        " lpad(g::text, 14, '0'), 'water', 'cjt188' FROM generate_series(1, $2) g"
        " RETURNING meter_id",
        tenant,
        meters,
    )
    rows, kids = [], []
    for r in ids:
        meter_id = int(r[0])
        blob = credentials.oscore_blob(secrets.token_bytes(16), secrets.token_bytes(8))
        kid = secrets.token_bytes(6)
        staged = random.random() < pending
        pkid = secrets.token_bytes(6) if staged else None
        psealed = credentials.seal(key, blob, meter_id) if staged else None
        psender = b"\x00" if staged else None
        sealed = credentials.seal(key, blob, meter_id)
        rows.append((meter_id, tenant, kid, b"\x00", sealed, pkid, psender, psealed))
        kids.append(pkid if pkid is not None and random.random() < 0.5 else kid)
    await conn.executemany(
        "INSERT INTO device_credentials (meter_id, tenant_id, oscore_kid, oscore_sender_id,"
        " oscore_sealed, oscore_pending_kid, oscore_pending_sender_id, oscore_pending_sealed)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        rows,
    )
    await conn.execute("ANALYZE device_credentials; ANALYZE meters")
    return kids


async def _time(fn: Callable[[], Awaitable[None]], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


async def main() -> None:
    """Fill a scratch database, time both lookups, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=20_000)
    parser.add_argument("--pending", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    server = os.environ["NBMETER_DATABASE_URL"]
    name, db_url = await scratch_database(server)
    key = secrets.token_bytes(32)
    try:
        conn = await asyncpg.connect(db_url)
        try:
            kids = await _fill(conn, key, args.meters, args.pending)
            batches = [
                random.sample(kids, args.batch - 4) + [secrets.token_bytes(6) for _ in range(4)]
                for _ in range(args.rounds)
            ]
            it_new, it_old = iter(batches), iter(batches)

            async def new() -> None:
                found, _ = await credentials.load_oscore_many(conn, key, next(it_new))
                assert len(found) == args.batch - 4

            async def old() -> None:
                rows = await conn.fetch(_OLD, sorted(set(next(it_old))))
                found = {}
                for row in rows:  # what the old loader then did per row
                    secret, salt, derived = credentials.open_oscore_blob(
                        key, bytes(row[5]), int(row[1])
                    )
                    found[bytes(row[0])] = credentials.OscoreSecret(
                        int(row[1]), int(row[2]), str(row[3]), bytes(row[0]), bytes(row[4]),
                        secret, salt, row[6], row[7], derived,
                    )  # fmt: skip

            new_ms, old_ms = [], []
            for _ in range(args.rounds // 10):  # alternate, so load drifts hit both alike
                old_ms += await _time(old, 10)
                new_ms += await _time(new, 10)
        finally:
            await conn.close()
    finally:
        await drop_database(server, name)

    def fig(ms: list[float]) -> str:
        ms = sorted(ms)
        return f"median {statistics.median(ms):.2f} ms, p95 {ms[int(len(ms) * 0.95)]:.2f} ms"

    print(f"meters {args.meters}, pending share {args.pending}, {args.batch} kids per lookup")
    print(f"old lookup (current kid only):  {fig(old_ms)}")
    print(f"new lookup (current or pending): {fig(new_ms)}")
    print(f"ratio new/old (median): {statistics.median(new_ms) / statistics.median(old_ms):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
