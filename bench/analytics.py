"""Analytics run time: N meters x D days of hourly interval data, districts included.

    python bench/analytics.py [--meters 100000] [--days 30] [--keep NAME]

Needs NBMETER_DATABASE_URL (a TimescaleDB server; a scratch database is created, migrated
and dropped unless --keep names it). Builds with binary COPY, one day at a time: every
customer meter reads on each local hour (Asia/Shanghai); 1 in 100 leaks 6 L/h day and
night; every 1,000 customers form a district behind a bulk meter that measures their sum
plus a loss (30 % more in 1 district of 10, 1 L/h elsewhere). Then times:
- `rollup_all_s`: `storage.analytics.run` over all D days (rollup + rules, as a backfill);
- `one_day_s`: the same for the last day again (what the collector does once a day);
- `silent_s`: a run with no day (what the collector does every few minutes).
And checks the alarms against what was built: night_flow on exactly the leaking meters,
district_loss on exactly the lossy districts (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import struct
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage import analytics  # noqa: E402
from storage.apikeys import create_tenant  # noqa: E402
from storage.migrate import migrate  # noqa: E402
from storage.rows import READ_S_EPOCH  # noqa: E402

FIRST_DAY = date(2026, 1, 1)  # local days from here
UTC_OFFSET_S = 8 * 3600  # Asia/Shanghai, the tenant's default zone (no DST)
PER_DISTRICT = 1000
ROW = np.dtype(
    [("n", ">i2"), ("l1", ">i4"), ("meter", ">i4"), ("l2", ">i4"), ("t", ">i4"),
     ("l3", ">i4"), ("reg", ">i8"), ("l4", ">i4"), ("flags", ">i4")]  # readings (0054)
)  # fmt: skip
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
Int64s = npt.NDArray[np.int64]


def say(msg: str) -> None:
    """Progress on stderr, figures on stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def hourly_flows(n: int) -> tuple[Int64s, Int64s, Int64s]:
    """(customer flows (n, 24) mL per local hour, bulk flows (n // 1000, 24), lossy
    district mask); customers 0..n-1 in order, district j = customers j*1000 ..."""
    i = np.arange(n, dtype=np.int64)[:, None]
    hour = np.arange(24, dtype=np.int64)[None, :]
    use = np.where(hour >= 6, 5000 + (i % 7) * 1000, 0)
    leak = np.where(i % 100 == 0, 6000, 0)
    customers = (use + leak).astype(np.int64)
    sums = customers.reshape(-1, PER_DISTRICT, 24).sum(axis=1)
    lossy = np.arange(len(sums)) % 10 == 0
    bulk = sums + np.where(lossy[:, None], sums * 3 // 10, 0) + 1000
    return customers, bulk.astype(np.int64), lossy


def day_block(ids: Int64s, flows: Int64s, start: Int64s, day: int) -> bytes:
    """Binary COPY rows of one local day (readings at hours 0..23) for meters `ids`."""
    n = len(ids)
    rows = np.zeros((n, 24), ROW)
    rows["n"], rows["l1"], rows["l2"], rows["l3"], rows["l4"] = 4, 4, 4, 8, 4
    rows["meter"] = ids[:, None]
    midnight_s = (FIRST_DAY - date(1970, 1, 1)).days * 86400 + day * 86400 - UTC_OFFSET_S
    t_s = midnight_s + np.arange(24, dtype=np.int64) * 3600 - READ_S_EPOCH
    rows["t"] = t_s[None, :]
    # the register at hour h: the day's start plus the flows of the hours before h
    rows["reg"] = start[:, None] + np.cumsum(flows, axis=1) - flows
    return rows.tobytes()


async def _chunks(data: bytes, size: int = 4 << 20) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def build(dsn: str, meters: int, days: int) -> tuple[int, int, int]:
    """Migrate, make the tenant, meters, districts and readings; (tenant, leaks, lossy)."""
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        tenant = await create_tenant(conn, "bench", "bench")
        n_d = meters // PER_DISTRICT
        await conn.execute(
            "INSERT INTO meters (tenant_id, address, kind, format)"
            " SELECT $1, 'C' || g, 'water', 'interval' FROM generate_series(1, $2) g",
            tenant, n_d * PER_DISTRICT,
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO meters (tenant_id, address, kind, format)"
            " SELECT $1, 'B' || g, 'water', 'interval' FROM generate_series(1, $2) g",
            tenant, n_d,
        )  # fmt: skip
        first = await conn.fetchval("SELECT min(meter_id) FROM meters")
        cust = np.arange(first, first + n_d * PER_DISTRICT, dtype=np.int64)
        bulk_ids = np.arange(cust[-1] + 1, cust[-1] + 1 + n_d, dtype=np.int64)
        await conn.execute(
            "INSERT INTO districts (tenant_id, name, bulk_meter_id)"
            " SELECT $1, 'D' || k, b FROM unnest($2::bigint[]) WITH ORDINALITY AS u(b, k)",
            tenant, bulk_ids.tolist(),
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO district_meters (district_id, meter_id)"
            " SELECT d.district_id, c FROM unnest($1::bigint[]) AS c"
            " JOIN districts d ON d.bulk_meter_id = $2 + (c - $3) / $4",
            cust.tolist(), int(bulk_ids[0]), int(cust[0]), PER_DISTRICT,
        )  # fmt: skip
        customers, bulk, lossy = hourly_flows(len(cust))
        ids = np.concatenate([cust, bulk_ids])
        flows = np.concatenate([customers, bulk])
        start = np.full(len(ids), 1_000_000, dtype=np.int64)
        t0 = time.perf_counter()
        cols = ["meter_id", "read_s", "register_ml", "flags"]
        for day in range(days + 1):  # the last: only the closing midnight's reading
            block = day_block(ids, flows, start, day)
            if day == days:
                block = np.frombuffer(block, ROW).reshape(len(ids), 24)[:, 0].tobytes()
            data = HEADER + block + TRAILER
            await conn.copy_to_table(
                "readings", source=_chunks(data), format="binary", columns=cols
            )
            start = start + flows.sum(axis=1)
            if day % 10 == 9:
                rows = len(ids) * 24 * (day + 1)
                say(f"readings: {rows:,} rows ({rows / (time.perf_counter() - t0):,.0f} rows/s)")
        t0 = time.perf_counter()
        await conn.execute("VACUUM ANALYZE readings")
        await conn.execute("VACUUM ANALYZE meters")
        say(f"vacuum analyze in {time.perf_counter() - t0:.1f} s")
        return tenant, int((np.arange(len(cust)) % 100 == 0).sum()), int(lossy.sum())
    finally:
        await conn.close()


async def measure(dsn: str, tenant: int, days: int, leaks: int, lossy: int) -> int:
    """Time the runs; print figures; 0 if the alarms are the ones built, else 1."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, command_timeout=7200)
    try:
        all_days = [FIRST_DAY + timedelta(days=k) for k in range(days)]
        now = datetime.combine(all_days[-1] + timedelta(days=1), datetime.min.time(), UTC)
        t0 = time.perf_counter()
        report = await analytics.run(pool, now=now, days=all_days, tenant_id=tenant)
        rollup_all = time.perf_counter() - t0
        t0 = time.perf_counter()
        await analytics.run(pool, now=now, days=all_days[-1:], tenant_id=tenant)
        one_day = time.perf_counter() - t0
        t0 = time.perf_counter()
        await analytics.run(pool, now=now, days=[], tenant_id=tenant)
        silent = time.perf_counter() - t0
        got = dict(
            await pool.fetch("SELECT kind, count(*) FROM alarms GROUP BY kind ORDER BY kind")
        )
    finally:
        await pool.close()
    print(f"meter_days={report.meter_days} alarms={got}")
    print(f"rollup_all_s={rollup_all:.2f} per_day_s={rollup_all / days:.2f}")
    print(f"one_day_s={one_day:.2f} silent_s={silent:.3f}")
    print(f"meter_days_per_s={report.meter_days / rollup_all:,.0f}")
    want = {"night_flow": leaks, "district_loss": lossy}
    ok = got == {k: v for k, v in want.items() if v}
    print(f"alarms_as_built={'yes' if ok else 'NO'} (want {want})")
    return 0 if ok else 1


async def main() -> int:
    """Build (or reuse --keep), measure, drop."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=100_000, help="customer meters")
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--keep", metavar="NAME", help="build into NAME and keep it")
    args = ap.parse_args()
    server = os.environ["NBMETER_DATABASE_URL"]
    name = args.keep or f"nbmeter_bench_{secrets.token_hex(4)}"
    dsn = urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        t0 = time.perf_counter()
        tenant, leaks, lossy = await build(dsn, args.meters, args.days)
        say(f"built in {time.perf_counter() - t0:.1f} s")
        print(f"meters={args.meters} days={args.days} readings={args.meters * 24 * args.days:,}")
        return await measure(dsn, tenant, args.days, leaks, lossy)
    finally:
        if not args.keep:
            admin = await asyncpg.connect(server)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
