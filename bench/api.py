"""Billing API benchmark (a script, not a test): whole-tenant export and single-meter latency.

    NBMETER_DATABASE_URL=... .venv/bin/python bench/api.py [--meters 1000000] [--clients 50]
        [--rates 50,100,200] [--api-workers 1] [--keep NAME]

Builds a scratch database with N meters x 2 billing cycles of daily readings (binary COPY,
rows laid out by numpy), starts the API under uvicorn in a subprocess, then prints:
- the time to stream the tenant's cycle reads as NDJSON through the API, against a raw
  `COPY (SELECT meter, register ...) TO STDOUT` of the same boundary rows on one
  connection (`ratio_vs_raw_copy`, target <= 3), and the API's peak RSS. The API runs
  NBMETER_EXPORT_CONNECTIONS COPYs at once (default 2; set it to 1 to compare);
- single-meter cycle-read latency p50/p99 (target p99 < 50 ms) with `--clients`
  concurrent clients, in two ways. Closed loop: each client sends its next request as
  soon as the last is answered, which finds the saturation throughput (latency there is
  queueing: 50 clients / throughput). Fixed rate: requests fall due at each of `--rates`
  per second in all, taken by the next free client, latency counted from when each fell
  due. Nearly every read is a meter's first read of the ended cycle, which publishes it.
The scratch database is dropped at the end, whatever happens, unless `--keep` names it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage.apikeys import create_api_key, create_tenant  # noqa: E402
from storage.migrate import migrate  # noqa: E402
from storage.rows import READ_S_EPOCH  # noqa: E402

FIRST_DAY = datetime(2023, 12, 29, tzinfo=UTC)  # readings from here, daily
DAYS = 66  # to 2024-03-04: covers cycles 2024-01-01 and 2024-02-01 (Asia/Shanghai) and margin
CYCLE = "2024-02-01"
ROW = np.dtype(
    [
        ("n", ">i2"),
        ("l1", ">i4"),
        ("meter", ">i4"),  # readings.meter_id is int4 (0049)
        ("l2", ">i4"),
        ("t", ">i4"),  # readings.read_s: int4 seconds since 2000 (0054)
        ("l3", ">i4"),
        ("reg", ">i8"),
        ("l4", ">i4"),
        ("flags", ">i4"),
    ]
)
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)


def say(msg: str) -> None:
    """Progress on stderr, figures on stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def day_block(first_id: int, n: int, day: int) -> bytes:
    """Binary COPY rows of one day's reading for n meters (time of day varies per meter)."""
    rows = np.zeros(n, ROW)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    rows["n"], rows["l1"], rows["l2"], rows["l3"], rows["l4"] = 4, 4, 4, 8, 4
    rows["meter"] = ids
    day_s = int(FIRST_DAY.timestamp()) + day * 86400 - READ_S_EPOCH
    offset_s = ids * 7919 % 86400  # spread over the day: mostly interpolated
    rows["t"] = day_s + offset_s
    per_day_ml = 100_000 + (ids % 400) * 1_000  # 100..499 L/day
    rows["reg"] = (ids % 1000) * 1_000_000 + per_day_ml * day
    return rows.tobytes()


async def build(dsn: str, meters: int) -> tuple[str, int]:
    """Migrate, create the tenant and its meters, COPY the readings; return (key, first id)."""
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        tenant = await create_tenant(conn, "bench", "bench")
        key = await create_api_key(conn, tenant, ["admin"])
        t0 = time.perf_counter()
        await conn.execute(
            "INSERT INTO meters (tenant_id, address, kind, format, service_point, installed_at)"
            " SELECT $1, 'B' || g, 'water', 'cjt188', 'SP' || g, '2023-01-01'"
            " FROM generate_series(1, $2) g",
            tenant,
            meters,
        )
        first = await conn.fetchval("SELECT min(meter_id) FROM meters")
        say(f"{meters:,} meters in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        for day in range(DAYS):
            data = HEADER + day_block(first, meters, day) + TRAILER
            await conn.copy_to_table(
                "readings",
                source=_chunks(data),
                format="binary",
                columns=["meter_id", "read_s", "register_ml", "flags"],
            )
            if day % 10 == 9 or day == DAYS - 1:
                done = meters * (day + 1)
                rate = done / (time.perf_counter() - t0)
                say(f"readings: {done:,} rows ({rate:,.0f} rows/s)")
        # as autovacuum would have long done on a live table: statistics, hint bits and the
        # visibility map, so neither measured query pays for first-touch of fresh rows
        t0 = time.perf_counter()
        await conn.execute("VACUUM ANALYZE meters")
        await conn.execute("VACUUM ANALYZE readings")
        say(f"vacuum analyze in {time.perf_counter() - t0:.1f} s")
    finally:
        await conn.close()
    return key, first


async def reuse(dsn: str) -> tuple[str, int, int]:
    """A new key for the kept database's tenant; (key, first meter id, meters)."""
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        tenant = await conn.fetchval("SELECT tenant_id FROM tenants WHERE slug = 'bench'")
        first, count = await conn.fetchrow("SELECT min(meter_id), count(*) FROM meters")
        return await create_api_key(conn, tenant, ["admin"]), first, count
    finally:
        await conn.close()


async def _chunks(data: bytes, size: int = 4 << 20):  # type: ignore[no-untyped-def]
    for i in range(0, len(data), size):
        yield data[i : i + size]


RAW_SELECT = """SELECT m.meter_id, po.register_ml, no.register_ml, pc.register_ml, nc.register_ml
FROM meters m
CROSS JOIN LATERAL (SELECT ('2024-02-01'::timestamp AT TIME ZONE 'Asia/Shanghai') AS o,
                           ('2024-03-01'::timestamp AT TIME ZONE 'Asia/Shanghai') AS c) b
LEFT JOIN LATERAL (SELECT register_ml FROM readings r WHERE r.meter_id = m.meter_id
    AND r.read_s <= nbm_floor_s(b.o) ORDER BY r.read_s DESC LIMIT 1) po ON true
LEFT JOIN LATERAL (SELECT register_ml FROM readings r WHERE r.meter_id = m.meter_id
    AND r.read_s > nbm_floor_s(b.o) ORDER BY r.read_s LIMIT 1) no ON true
LEFT JOIN LATERAL (SELECT register_ml FROM readings r WHERE r.meter_id = m.meter_id
    AND r.read_s <= nbm_floor_s(b.c) ORDER BY r.read_s DESC LIMIT 1) pc ON true
LEFT JOIN LATERAL (SELECT register_ml FROM readings r WHERE r.meter_id = m.meter_id
    AND r.read_s > nbm_floor_s(b.c) ORDER BY r.read_s LIMIT 1) nc ON true
ORDER BY m.meter_id"""


async def raw_copy(dsn: str) -> tuple[float, int]:
    """Seconds and bytes of the raw boundary-row COPY."""
    conn = await asyncpg.connect(dsn)
    size = 0

    async def sink(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)

    try:
        await conn.execute("SET jit = off")  # as the API's connections
        t0 = time.perf_counter()
        await conn.copy_from_query(RAW_SELECT, output=sink)
        return time.perf_counter() - t0, size
    finally:
        await conn.close()


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """The largest VmHWM (MiB) of a process and its children (the API's workers)."""
    peak = float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            peak = max(peak, peak_rss_mb(int(child)))
    return peak


async def export_via_api(base: str, key: str) -> tuple[float, int, int]:
    """Seconds, bytes and lines of the NDJSON export through the API."""
    headers = {"Authorization": f"Bearer {key}"}
    size = lines = 0
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        t0 = time.perf_counter()
        async with client.stream(
            "GET", f"/v1/cycles/{CYCLE}/reads?format=ndjson", headers=headers
        ) as r:
            r.raise_for_status()
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                lines += chunk.count(b"\n")
        return time.perf_counter() - t0, size, lines


class Http:
    """A minimal keep-alive HTTP/1.1 GET client on one connection.

    The load generator shares the machine with the server and PostgreSQL: httpx spends
    ~5 ms of CPU per request under concurrency, twice the server's own share, so it would
    measure itself. This costs ~0.1 ms.
    """

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port = host, port
        self.head = f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of GET path; the server must answer with a Content-Length."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.head)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        """Close the connection."""
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def latency(
    base: str, key: str, ids: list[int], clients: int, rate: float | None
) -> tuple[list[float], float]:
    """Latencies (s) of one cycle read per id by `clients` concurrent clients, and the rate.

    rate None: closed loop, each client sends its next request when the last one is
    answered (the server's saturation throughput; latency is then mostly queueing).
    rate R: requests are due at a fixed R per second in all, each taken by the next free
    client; a latency counts from when the request was due, so a server falling behind
    is charged its queueing (no coordinated omission).
    """
    url = urlsplit(base)
    conns = [Http(url.hostname or "127.0.0.1", url.port or 80, key) for _ in range(clients)]
    out: list[float] = []
    queue = list(enumerate(ids))
    queue.reverse()
    t0 = time.perf_counter()

    async def worker(http: Http) -> None:
        while queue:
            k, mid = queue.pop()
            due = time.perf_counter() if rate is None else t0 + k / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            status, body = await http.get(f"/v1/meters/{mid}/cycles/{CYCLE}")
            out.append(time.perf_counter() - due)
            if status != 200:
                raise RuntimeError(f"meter {mid}: HTTP {status}: {body[:300]!r}")

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    return sorted(out), len(out) / (time.perf_counter() - t0)


def _pct(lat: list[float], q: float) -> float:
    return lat[min(len(lat) - 1, int(len(lat) * q))] * 1000


async def main() -> int:
    """Build, measure, print, drop."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meters", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=3000, help="cycle reads per latency phase")
    ap.add_argument(
        "--rates",
        default="50,100,200",
        help="fixed aggregate request rates (per second) of the fixed-rate phases",
    )
    ap.add_argument(
        "--seed", type=int, default=7, help="meter draw (change it to reuse a --keep database)"
    )
    ap.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--skip-export", action="store_true", help="latency phases only")
    ap.add_argument(
        "--keep",
        metavar="NAME",
        help="build into database NAME and keep it; reuse it when it exists (for repeated runs)",
    )
    args = ap.parse_args()
    server = os.environ["NBMETER_DATABASE_URL"]
    name = args.keep or f"nbmeter_bench_{secrets.token_hex(4)}"
    dsn = urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    admin = await asyncpg.connect(server)
    exists = await admin.fetchval("SELECT true FROM pg_database WHERE datname = $1", name)
    if not exists:
        await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    proc = None
    try:
        if exists:
            key, first, args.meters = await reuse(dsn)
            say(f"reusing {name}: {args.meters:,} meters")
        else:
            key, first = await build(dsn, args.meters)
        port = free_port()
        env = {**os.environ, "NBMETER_DATABASE_URL": dsn, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measurement
            [
                sys.executable,
                "-m",
                "api.serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--workers",
                str(args.api_workers),
            ],
            cwd=ROOT,
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base) as c:
            for _ in range(100):
                try:
                    if (await c.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        print(f"meters={args.meters} readings={args.meters * DAYS}")
        if not args.skip_export:
            say("streaming the export through the API")
            api_s, api_bytes, lines = await export_via_api(base, key)
            say(f"API: {lines:,} lines, {api_bytes / 1e6:.0f} MB in {api_s:.1f} s; raw COPY next")
            raw_s, raw_bytes = await raw_copy(dsn)
            print(f"export_ndjson_s={api_s:.2f} lines={lines} bytes={api_bytes}")
            print(f"raw_copy_s={raw_s:.2f} bytes={raw_bytes}")
            print(f"ratio_vs_raw_copy={api_s / raw_s:.2f}")
        # Random meters of the ended cycle: nearly every read is the meter's first service,
        # which publishes its boundary reads (an insert and a commit): the dearer path.
        rng = np.random.default_rng(args.seed)
        draw = (first + rng.permutation(args.meters)).tolist()
        phases: list[tuple[str, float | None]] = [("warm-up", None), ("closed-loop", None)]
        phases += [(f"fixed-rate {r} rps", float(r)) for r in args.rates.split(",")]
        for label, rate in phases:
            n = args.requests if label != "warm-up" else min(500, args.requests)
            ids, draw = draw[:n], draw[n:]
            if len(ids) < n:
                raise SystemExit("not enough meters for every phase: lower --requests")
            say(f"latency, {label}: {n} cycle reads by {args.clients} clients")
            lat, rps = await latency(base, key, ids, args.clients, rate)
            if label == "warm-up":
                continue
            tag = "closed_loop" if rate is None else f"rate_{rate:.0f}"
            print(
                f"cycle_read_{tag}: p50_ms={_pct(lat, 0.5):.1f} p99_ms={_pct(lat, 0.99):.1f}"
                f" max_ms={lat[-1] * 1000:.1f} throughput_rps={rps:.0f}"
                f" clients={args.clients} requests={len(lat)}"
            )
        print(f"api_peak_rss_mb={peak_rss_mb(proc.pid):.0f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if args.keep:
            say(f'kept {name}; drop it with: DROP DATABASE "{name}" WITH (FORCE)')
        else:
            admin = await asyncpg.connect(server)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
            say(f"dropped {name}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
