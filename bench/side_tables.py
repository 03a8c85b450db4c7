"""Event and health writes per committed batch: storage's staged binary COPY vs a single
`INSERT ... SELECT FROM unnest(...)` (how the collector wrote them before).

    python bench/side_tables.py [--rounds 30] [--sizes 1,16,128,1024]

Needs NBMETER_DATABASE_URL (a TimescaleDB server; a scratch database is created, migrated
and dropped). Per batch size it times, inside one transaction per call as the collector
does (commit included), a batch of fresh meter_events + device_health rows, then the same
batch again (a replay, nothing new), and prints the median milliseconds per batch of each
way and their ratio (staged / unnest). The meters' rows get fresh times each round, so
every first write is new.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from storage.events import EventRow, write_events
from storage.health import HealthRow, write_health
from storage.migrate import migrate

_EVENTS_UNNEST = (
    "INSERT INTO meter_events (meter_id, occurred_at, kind, received_at)"
    " SELECT m, o, k, r FROM unnest($1::bigint[], $2::timestamptz[], $3::text[],"
    " $4::timestamptz[]) AS u(m, o, k, r) ORDER BY m, k, o ON CONFLICT DO NOTHING"
)
_HEALTH_UNNEST = (
    "INSERT INTO device_health (meter_id, measured_at, battery_mv, rsrp_cdbm, sinr_cdb,"
    " ecl, received_at) SELECT m, t, b, r, s, e, rc FROM unnest($1::bigint[],"
    " $2::timestamptz[], $3::int[], $4::int[], $5::int[], $6::smallint[],"
    " $7::timestamptz[]) AS u(m, t, b, r, s, e, rc) ORDER BY m, t ON CONFLICT DO NOTHING"
)


def _database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _rows(meters: list[int], n: int, at: datetime) -> tuple[list[EventRow], list[HealthRow]]:
    events = [
        EventRow(meters[i % len(meters)], at + timedelta(seconds=i), "leak", at) for i in range(n)
    ]
    health = [
        HealthRow(meters[i % len(meters)], at + timedelta(seconds=i), 3_600, -10_550, 120, 1, at)
        for i in range(n)
    ]
    return events, health


async def _staged(
    conn: asyncpg.Connection, events: list[EventRow], health: list[HealthRow]
) -> None:
    async with conn.transaction():
        await write_events(conn, events)
        await write_health(conn, health)


async def _unnest(
    conn: asyncpg.Connection, events: list[EventRow], health: list[HealthRow]
) -> None:
    async with conn.transaction():
        await conn.execute(
            _EVENTS_UNNEST,
            *(
                list(c)
                for c in zip(
                    *[(e.meter_id, e.occurred_at, e.kind, e.received_at) for e in events],
                    strict=True,
                )
            ),
        )
        await conn.execute(
            _HEALTH_UNNEST,
            *(
                list(c)
                for c in zip(
                    *[
                        (
                            h.meter_id,
                            h.measured_at,
                            h.battery_mv,
                            h.rsrp_cdbm,
                            h.sinr_cdb,
                            h.ecl,
                            h.received_at,
                        )
                        for h in health
                    ],
                    strict=True,
                )
            ),
        )


async def measure(url: str, args: argparse.Namespace) -> None:
    """Median ms per batch, per size and way, on the migrated scratch database at `url`."""
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        tenant = await conn.fetchval(
            "INSERT INTO tenants (slug, name) VALUES ('bench', 'bench') RETURNING tenant_id"
        )
        meters = [
            r["meter_id"]
            for r in await conn.fetch(
                "INSERT INTO meters (tenant_id, address, kind, format)"
                " SELECT $1, lpad(g::text, 14, '0'), 'water', 'cjt188'"
                " FROM generate_series(1, 1024) g RETURNING meter_id",
                tenant,
            )
        ]
        base = datetime(2026, 1, 1, tzinfo=UTC)
        step = 0
        for size in args.sizes:
            times: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for way, write in (("staged", _staged), ("unnest", _unnest)):
                    step += 1
                    events, health = _rows(meters, size, base + timedelta(days=step))
                    for phase in ("new", "replay"):
                        t0 = time.perf_counter()
                        await write(conn, events, health)
                        times.setdefault(f"{way}_{phase}", []).append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(
                f"rows={size:5d} staged_new_ms={med['staged_new']:.3f}"
                f" unnest_new_ms={med['unnest_new']:.3f}"
                f" staged_replay_ms={med['staged_replay']:.3f}"
                f" unnest_replay_ms={med['unnest_replay']:.3f}"
                f" ratio_new={med['staged_new'] / med['unnest_new']:.2f}"
                f" ratio_replay={med['staged_replay'] / med['unnest_replay']:.2f}",
                flush=True,
            )
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> None:
    """Create, measure and drop the scratch database."""
    name = f"nbmeter_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        await measure(_database(args.dsn, name), args)
    finally:
        admin = await asyncpg.connect(args.dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def main() -> None:
    """Parse the arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 128, 1024]
    )
    parser.add_argument("--dsn", default=os.environ.get("NBMETER_DATABASE_URL", ""))
    args = parser.parse_args()
    if not args.dsn:
        parser.error("set NBMETER_DATABASE_URL or pass --dsn")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
