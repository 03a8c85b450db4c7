"""A city day, scaled: a fleet's daily OSCORE uplinks through the real collector and database.

    NBMETER_DATABASE_URL=... .venv/bin/python bench/cityday.py [--meters 200000]
        [--herd 0.3] [--spread-load 0.8] [--compare 20000] [--window 400] [--herd-window 1000]
        [--budget-s 780] [--collectors 1] [--keep] [--compare-only] [--no-lane]

A scratch database (created, migrated, dropped at the end) gets a tenant with `--meters`
water and gas meters in three formats: 60% interval `nbm1` (a register and 23 hourly
deltas: 24 readings), 30% SenML (LwM2M 3424 pack of 24 hourly registers: 24 readings),
10% CJ/T 188 (DI 901F, the midnight register: 1 reading; these meters report no
intervals). Each meter gets an OSCORE context as `nbmeter device provision` makes one
(stored sealed under a fresh credentials key; written in bulk here). Before anything is
timed, every meter's daily uplink is protected with its own client context, built from
aiocoap's OSCORE primitives (the maintained RFC 8613 code the collector runs too), so
the load generator only sends bytes.

Same run, one phase after the other, each against a fresh process (so each OSCORE
uplink meets a cold context cache, as a meter reporting once a day does):
1. compare: `--compare` nbm1 uplinks closed loop (window `--window`) against a bare
   aiocoap server (2.04 at once), then `--compare-rounds` alternating rounds of the
   collector on plain CoAP (a lab tenant) and on OSCORE (other nbm1 meters of the fleet
   each round, the day before); the ratios are of the rounds' medians;
2. the city day: (1 - `--herd`) of the fleet arrives paced at `--spread-load` times the
   OSCORE rate of phase 1 (reports spread over the reporting window; faster if needed
   to end within `--budget-s`), then the rest at once (the herd after an outage:
   `--herd-window` devices waiting at any time, retransmitting as RFC 7252 says).
   Answers are 2.04 only after commit; a 5.03 sends the uplink again later. The city day
   runs `--collectors` collector processes on one port (SO_REUSEPORT; the generator's
   `--sockets` source ports spread over them); its CPU per uplink is theirs together.
3. the billing side: close the cycle that ends after that day for every meter (publish
   its boundary reads, as POST /v1/cycles/{id}/close) and stream the NDJSON export (the
   export's storage path, without HTTP, on sessions set up as the API's), each timed.

Printed: uplinks/s and readings/s sustained (the herd), CPU µs per uplink in the
collector and in its PostgreSQL backends, answer times p50/p99 per phase, uplinks per
committed batch, peak RSS; bytes on disk per reading (readings heap + indexes) as
ingested and, in the city day's chunk, once `storage.compaction` (the collector's job for
closed chunks) has rebuilt its indexes, and per uplink (raw archive, OSCORE answers, WAL
written: the server's WAL is shared by every database on it, so that figure is an upper
bound on a shared server); the billing
times; then the projection for a Shenzhen day (26.6 M uplinks) from the CPU µs per
uplink: on a loaded shared machine CPU per uplink is the robust figure (rates fall with
the neighbours' load, CPU time per uplink much less). Last line `shenzhen_day_hours=<x>`.

The collectors answer the common uplink in the uplink lane (`collector.coap_lane`);
`--no-lane` runs them on aiocoap's path alone, as before the lane, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import aiocoap
import asyncpg
from aiocoap import oscore
from aiocoap.message import Direction

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import (
    TOKEN,
    ListSource,
    LoadGenerator,
    Measured,
    Watch,
    batch_stats,
    coap_post,
    drop_database,
    free_tcp_port,
    free_udp_port,
    load_average,
    rss_mb,
    scratch_database,
    start_bare_aiocoap,
    start_collector,
    stop,
    wait_ready,
    watcher,
)

from billing.boundary import Tuning
from decoder.encode_cjt188 import GAS, WATER, encode_cjt188
from decoder.encode_senml import encode_senml, water_pack
from decoder.interval import encode_interval
from devices.provision import derive
from storage import billing, compaction, credentials
from storage.export import stream_cycle
from storage.pool import create_pool

HOUR, DAY = 3600, 86_400
SHENZHEN_UPLINKS = 26_600_000  # 13.3 M homes, water and gas, one uplink a day each
MACHINE_CORES = 2
SERVER_SENDER_ID = b"\x00"  # as collector.provision: ours, the same in every context
MIX = (("interval", 0.6), ("senml", 0.3), ("cjt188", 0.1))


@dataclass(frozen=True)
class Meter:
    """One meter of the fleet, with what its OSCORE context is made of."""

    meter_id: int
    address: str
    kind: str
    fmt: str
    kid: bytes
    secret: bytes
    salt: bytes


class ClientContext(oscore.CanProtect, oscore.SecurityContextUtils):
    """A meter's side of its OSCORE context (RFC 8613 §3.2), from the provisioned values."""

    def __init__(self, meter: Meter, first_seqno: int) -> None:
        self.alg_aead = oscore.algorithms[oscore.DEFAULT_ALGORITHM]
        self.hashfun = oscore.hashfunctions[oscore.DEFAULT_HASHFUNCTION]
        self.sender_id = meter.kid
        self.recipient_id = SERVER_SENDER_ID
        self.id_context = None
        self.derive_keys(meter.salt, meter.secret)
        self.sender_sequence_number = first_seqno

    def post_seqnoincrease(self) -> None:
        """A meter persists its sequence number; nothing to do here."""


def protect(meter: Meter, payload: bytes, seqno: int) -> bytes:
    """The CON POST /u of `payload` protected with `meter`'s context, sequence `seqno`."""
    msg = aiocoap.Message(code=aiocoap.POST, uri_path=("u",), payload=payload)
    msg.mtype, msg.mid, msg.token = aiocoap.CON, 0, TOKEN
    msg.direction = Direction.OUTGOING
    outer, _ = ClientContext(meter, seqno).protect(msg)
    outer.mid, outer.token, outer.mtype = 0, TOKEN, aiocoap.CON
    return bytes(outer.encode())


def payload(meter: Meter, day_s: int, rng: random.Random) -> tuple[bytes, int]:
    """`meter`'s uplink for the day starting `day_s` (UTC): (bytes, readings it carries)."""
    base_l = 1000 + meter.meter_id % 5000
    deltas = [rng.randrange(0, 40) * 1000 for _ in range(23)]
    if meter.fmt == "interval":
        return encode_interval(meter.address, day_s, base_l * 1000, deltas), 24
    regs = [base_l * 1000]
    for d in deltas:
        regs.append(regs[-1] + d)
    if meter.fmt == "senml":
        pack = water_pack(meter.address, [(day_s + h * HOUR, ml) for h, ml in enumerate(regs)])
        return encode_senml(pack), 24
    frame = encode_cjt188(
        address=meter.address,
        total_ml=regs[-1] // 10_000 * 10_000,  # 0.01 m3 resolution
        meter_type=WATER if meter.kind == "water" else GAS,
        clock=datetime.fromtimestamp(day_s + 23 * HOUR, UTC),
    )
    return frame, 1


async def provision_fleet(
    db_url: str, n: int, key: bytes, rng: random.Random
) -> tuple[int, int, list[Meter]]:
    """(tenant, lab tenant, meters): the fleet with sealed OSCORE contexts, in bulk."""
    conn = await asyncpg.connect(db_url)
    try:
        tenant = await conn.fetchval(
            "INSERT INTO tenants (slug, name) VALUES ('city', 'city') RETURNING tenant_id"
        )
        lab = await conn.fetchval(
            "INSERT INTO tenants (slug, name, allow_plain_coap) VALUES ('lab', 'lab', true)"
            " RETURNING tenant_id"
        )
        fmts = [f for f, share in MIX for _ in range(round(share * 1000))]
        rows = [
            (tenant, f"{i:014d}", "gas" if i % 3 == 0 else "water", fmts[i % len(fmts)])
            for i in range(1, n + 1)
        ]
        await conn.copy_records_to_table(
            "meters", records=rows, columns=["tenant_id", "address", "kind", "format"]
        )
        ids = await conn.fetch(
            "SELECT meter_id, address, kind, format FROM meters WHERE tenant_id = $1"
            " ORDER BY meter_id",
            tenant,
        )
        meters = [
            Meter(
                int(r[0]),
                r[1],
                r[2],
                r[3],
                b"\x01" + int(r[0]).to_bytes(5, "big"),
                rng.randbytes(16),
                rng.randbytes(8),
            )
            for r in ids
        ]
        sealed = [
            (
                m.meter_id,
                tenant,
                m.kid,
                SERVER_SENDER_ID,
                credentials.seal(
                    key,
                    # as collector.provision stores it: derived keys included
                    credentials.oscore_blob(
                        m.secret, m.salt, derive(m.kid, SERVER_SENDER_ID, m.secret, m.salt)
                    ),
                    m.meter_id,
                ),
            )
            for m in meters
        ]
        await conn.copy_records_to_table(
            "device_credentials",
            records=sealed,
            columns=["meter_id", "tenant_id", "oscore_kid", "oscore_sender_id", "oscore_sealed"],
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return int(tenant), int(lab), meters


async def lab_meters(db_url: str, lab: int, n: int) -> list[str]:
    """`n` interval meters of the lab tenant (plain CoAP); their addresses."""
    addresses = [f"9{i:013d}" for i in range(1, n + 1)]
    conn = await asyncpg.connect(db_url)
    try:
        await conn.copy_records_to_table(
            "meters",
            records=[(lab, a, "water", "interval") for a in addresses],
            columns=["tenant_id", "address", "kind", "format"],
        )
    finally:
        await conn.close()
    return addresses


class Phase:
    """One collector process on a port of its own, driven by the load generator."""

    def __init__(self, server_url: str, db_name: str, db_url: str, env: dict[str, str]) -> None:
        self.server_url, self.db_name, self.db_url, self.env = server_url, db_name, db_url, env

    async def run(
        self, datagrams: list[bytes], *, window: int, sockets: int, rate: float | None = None
    ) -> tuple[Measured, tuple[float, float], float]:
        """(measured, `_per_batch`, peak RSS MiB) of one collector run."""
        port, metrics_port = free_udp_port(), free_tcp_port()
        proc = start_collector(self.db_url, port, metrics_port, self.env)
        try:
            await wait_ready(proc, metrics_port)
            watch = watcher(self.server_url, self.db_name, [proc.pid])
            b0 = batch_stats([metrics_port])
            got = await LoadGenerator(ListSource(datagrams)).run(
                port, window=window, sockets=sockets, watch=watch, rate=rate
            )
            b1 = batch_stats([metrics_port])
            rss = rss_mb(proc.pid)
        finally:
            stop(proc)
        return got, _per_batch(b0, b1), rss


def _per_batch(
    b0: tuple[float, float, float, float], b1: tuple[float, float, float, float]
) -> tuple[float, float]:
    """(uplinks per committed batch, key ids per OSCORE context lookup) between two
    `batch_stats` readings."""
    return (b1[1] - b0[1]) / max(b1[0] - b0[0], 1), (b1[3] - b0[3]) / max(b1[2] - b0[2], 1)


def _line(
    name: str, m: Measured, per_batch: tuple[float, float], rss: float, readings: float
) -> str:
    return (
        f"{name}: uplinks_per_s={m.bulk_rate():.0f} readings_per_s={m.bulk_rate() * readings:.0f}"
        f" cpu_us_per_uplink={m.us('server'):.0f} db_cpu_us_per_uplink={m.us('db'):.0f}"
        f" p50_ms={m.percentile_ms(50):.0f} p99_ms={m.percentile_ms(99):.0f}"
        f" uplinks_per_batch={per_batch[0]:.1f} kids_per_lookup={per_batch[1]:.1f}"
        f" peak_rss_mb={rss:.0f} answered={m.done}"
        f" retransmitted={m.retransmitted} answers={ {hex(k): v for k, v in m.answers.items()} }"
    )


_SIZES_SQL = """
SELECT (SELECT table_bytes FROM hypertable_detailed_size('readings')),
       (SELECT index_bytes FROM hypertable_detailed_size('readings')),
       (SELECT total_bytes FROM hypertable_detailed_size('raw_uplinks')),
       pg_total_relation_size('oscore_answers'),
       (SELECT count(*) FROM readings), (SELECT count(*) FROM raw_uplinks),
       pg_current_wal_lsn()
"""


def with_generator(watch: Watch) -> Watch:
    """`watch` plus this process, the load generator (group "generator"): it shares the
    machine's cores with the collector and PostgreSQL, so it bounds the measured rate."""

    async def watched() -> dict[str, list[int]]:
        return {**await watch(), "generator": [os.getpid()]}

    return watched


async def sizes(db_url: str) -> asyncpg.Record:
    """Bytes of readings (heap, indexes), raw archive, OSCORE answers; rows; WAL position."""
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow(_SIZES_SQL)
        assert row is not None
        return row
    finally:
        await conn.close()


async def wal_bytes(db_url: str, since: str) -> int:
    """WAL written on the server since LSN `since` (every database on it)."""
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", since))
    finally:
        await conn.close()


_CHUNK_SQL = """
SELECT format('%I.%I', c.chunk_schema, c.chunk_name), s.table_bytes, s.index_bytes
FROM timescaledb_information.chunks c
JOIN chunks_detailed_size('readings') s
  ON s.chunk_schema = c.chunk_schema AND s.chunk_name = c.chunk_name
WHERE c.hypertable_name = 'readings' AND c.range_start_integer <= nbm_floor_s($1)
  AND c.range_end_integer > nbm_floor_s($1)
"""


class Medians:
    """The median of several runs' figures, read as one run's (`bulk_rate`, `us`)."""

    def __init__(self, runs: list[Measured]) -> None:
        self._runs = runs

    def bulk_rate(self) -> float:
        """Median uplinks per second."""
        return statistics.median(r.bulk_rate() for r in self._runs)

    def us(self, who: str) -> float:
        """Median CPU µs per uplink of `who` ("server" or "db")."""
        return statistics.median(r.us(who) for r in self._runs)


async def compacted(db_url: str, day: datetime) -> None:
    """Compact the closed chunks (storage.compaction, as the collector does once a day's
    chunk is closed) and print the city day's chunk's bytes per reading after it."""
    conn = await asyncpg.connect(db_url)
    try:
        t0 = time.monotonic()
        done = await compaction.compact_closed(conn, after=timedelta(0))
        took = time.monotonic() - t0
        row = await conn.fetchrow(_CHUNK_SQL, day)
        assert row is not None
        assert done
        n = max(int(await conn.fetchval(f"SELECT count(*) FROM {row[0]}")), 1)
        print(
            f"bytes_per_reading_compacted={(row[1] + row[2]) / n:.1f}"
            f" (heap {row[1] / n:.1f} + indexes {row[2] / n:.1f}; the city day's chunk of"
            f" {n:,} readings after storage.compaction: {len(done)} chunks in {took:.1f}s)",
            flush=True,
        )
    finally:
        await conn.close()


async def billing_side(db_url: str, tenant: int, day: date) -> None:
    """Close the cycle ending after `day` for every meter, then stream its NDJSON export,
    on sessions set up as the API's (generic plans, no runtime chunk exclusion:
    storage.billing.SESSION_SETTINGS)."""
    pool = await create_pool(
        db_url, min_size=2, max_size=4, server_settings=billing.SESSION_SETTINGS
    )
    try:
        tuning = Tuning(timedelta(hours=1))
        start, end = day - timedelta(days=30), day + timedelta(days=1)
        async with pool.acquire() as conn:
            # the day's chunk is new: without its statistics (autovacuum gathers them a
            # minute or so later) the close chose a plan ~10x slower at 200k meters
            t0 = time.monotonic()
            await conn.execute("ANALYZE readings")
            print(f"analyze_s={time.monotonic() - t0:.1f}", flush=True)
            zones = await billing.zones(conn, tenant)
            t0 = time.monotonic()
            totals = [0, 0]
            for zone in zones:
                got = await billing.publish_cycle(
                    conn, billing.CycleQuery(tenant, start, end, zone, tuning)
                )
                totals = [totals[0] + got["boundaries"], totals[1] + got["published"]]
            close_s = time.monotonic() - t0
        print(
            f"billing_close_s={close_s:.1f} boundaries={totals[0]} published={totals[1]}",
            flush=True,
        )
        queries = [billing.CycleQuery(tenant, start, end, z, tuning).args() for z in zones]
        t0, size, lines = time.monotonic(), 0, 0
        async for chunk in stream_cycle(pool, queries, "ndjson"):
            size += len(chunk)
            lines += chunk.count(b"\n")
        print(f"export_ndjson_s={time.monotonic() - t0:.1f} lines={lines} bytes={size}", flush=True)
    finally:
        await pool.close()


async def main(args: argparse.Namespace) -> None:
    """Set up, run the three phases, print the figures; last line the Shenzhen projection."""
    server_url = os.environ["NBMETER_DATABASE_URL"]
    rng = random.Random(args.seed)
    print(f"# load_average={load_average()} meters={args.meters}", flush=True)
    t_setup = time.monotonic()
    name, db_url = await scratch_database(server_url)
    try:
        key_text = credentials.new_key()
        key = credentials.parse_key(key_text)
        tenant, lab, meters = await provision_fleet(db_url, args.meters, key, rng)
        rounds = max(1, args.compare_rounds)
        compare = min(args.compare, sum(m.fmt == "interval" for m in meters) // rounds)
        labs = await lab_meters(db_url, lab, compare)
        print(f"setup_s={time.monotonic() - t_setup:.1f}", flush=True)

        today = int(time.time()) // DAY * DAY
        day_s = today - 2 * DAY  # the city day: ended, so its cycle can close
        t0 = time.monotonic()
        # each round its own readings: the lab meters' day k before, other nbm1 meters
        plains = [
            [
                coap_post(encode_interval(a, day_s - k * DAY, 1_000_000, [1000] * 23), b"t=lab")
                for a in labs
            ]
            for k in range(rounds)
        ]
        nbm1 = [m for m in meters if m.fmt == "interval"][: compare * rounds]
        oscores = [
            [protect(m, payload(m, day_s - DAY, rng)[0], 0) for m in nbm1[k::rounds]]
            for k in range(rounds)
        ]
        order = list(meters)
        rng.shuffle(order)
        city: list[bytes] = []
        readings = 0
        for m in order:
            frame, n = payload(m, day_s, rng)
            readings += n
            city.append(protect(m, frame, 1))
        per_uplink = readings / len(order)
        print(
            f"precompute_s={time.monotonic() - t0:.1f} (payloads and OSCORE protection,"
            f" not timed) readings_per_uplink={per_uplink:.2f}",
            flush=True,
        )

        # 1. same-run comparison: bare aiocoap, plain CoAP collector, OSCORE collector
        port = free_udp_port()
        bare = start_bare_aiocoap(port)
        await asyncio.sleep(1.5)
        base = await LoadGenerator(ListSource(list(plains[0]))).run(
            port,
            window=args.window,
            sockets=args.sockets,
            watch=watcher(server_url, None, [bare.pid]),
        )
        stop(bare)
        print(
            f"bare_aiocoap: uplinks_per_s={base.bulk_rate():.0f}"
            f" cpu_us_per_uplink={base.us('server'):.0f}",
            flush=True,
        )
        env = {"NBMETER_CREDENTIALS_KEY": key_text}
        if args.no_lane:  # aiocoap's path for every uplink (collector.coap_lane off)
            env["NBMETER_COAP__UPLINK_LANE"] = "false"
        phase = Phase(server_url, name, db_url, env)
        # alternating rounds, each against a fresh collector: a round lasts seconds, so
        # one alone moves with whatever else the machine does then; the medians do not
        plain_runs, oscore_runs = [], []
        for k in range(rounds):
            lab_run = await phase.run(plains[k], window=args.window, sockets=args.sockets)
            print(_line(f"plain_coap[{k + 1}]", *lab_run, 24), flush=True)
            osc_run = await phase.run(oscores[k], window=args.window, sockets=args.sockets)
            print(_line(f"oscore[{k + 1}]", *osc_run, 24), flush=True)
            plain_runs.append(lab_run[0])
            oscore_runs.append(osc_run[0])
        p, o = Medians(plain_runs), Medians(oscore_runs)
        p_all, o_all = p.us("server") + p.us("db"), o.us("server") + o.us("db")
        per_round = " ".join(
            f"{b.bulk_rate() / max(a.bulk_rate(), 1e-9):.2f}"
            for a, b in zip(plain_runs, oscore_runs, strict=True)
        )
        print(
            f"oscore_vs_plain (medians of {rounds} alternating rounds of {compare} uplinks):"
            f" rate_ratio={o.bulk_rate() / max(p.bulk_rate(), 1e-9):.2f}"
            f" cpu_ratio={p.us('server') / max(o.us('server'), 1e-9):.2f}"
            f" cpu_ratio_with_db={p_all / max(o_all, 1e-9):.2f}"
            f" (plain CPU per uplink / OSCORE CPU per uplink; >= 0.8 is the target)"
            f" plain_vs_bare_aiocoap_cpu={base.us('server') / max(p.us('server'), 1e-9):.2f};"
            f" rate ratio per round {per_round}; medians: plain {p.bulk_rate():.0f}/s"
            f" {p.us('server'):.0f}+{p.us('db'):.0f} µs, OSCORE {o.bulk_rate():.0f}/s"
            f" {o.us('server'):.0f}+{o.us('db'):.0f} µs",
            flush=True,
        )

        if args.compare_only:
            return

        # 2. the city day
        before = await sizes(db_url)
        herd_n = int(len(city) * args.herd)
        spread, herd = city[: len(city) - herd_n], city[len(city) - herd_n :]
        rate = max(50.0, o.bulk_rate() * args.spread_load)
        # keep the whole run within --budget-s: on a machine too loaded for the paced
        # share at that rate, pace faster (at most closed loop: the herd's own pace)
        left_s = args.budget_s - (time.monotonic() - t_setup) - herd_n / max(o.bulk_rate(), 1)
        left_s -= 60 + len(city) / 5000  # the billing side
        if len(spread) / rate > left_s:
            rate = len(spread) / max(left_s, 1.0)
            print(f"# paced at {rate:.0f}/s to stay within --budget-s {args.budget_s:.0f}")
        # --collectors processes share the port (SO_REUSEPORT), as a city's machine runs them
        port = free_udp_port()
        metrics_ports = [free_tcp_port() for _ in range(args.collectors)]
        procs = []
        try:
            for metrics_port in metrics_ports:
                procs.append(start_collector(db_url, port, metrics_port, env))
                await wait_ready(procs[-1], metrics_port)
            watch = with_generator(watcher(server_url, name, [p.pid for p in procs]))
            b0 = batch_stats(metrics_ports)
            sm = await LoadGenerator(ListSource(spread)).run(
                port,
                window=args.herd_window,
                sockets=args.sockets,
                watch=watch,
                rate=rate,
                progress_s=60,
            )
            b1 = batch_stats(metrics_ports)
            hm = await LoadGenerator(ListSource(herd)).run(
                port, window=args.herd_window, sockets=args.sockets, watch=watch, progress_s=60
            )
            b2 = batch_stats(metrics_ports)
            rss = max(rss_mb(p.pid) for p in procs)
        finally:
            for proc in procs:
                stop(proc)
        print(
            _line(
                f"spread(paced {rate:.0f}/s)",
                sm,
                _per_batch(b0, b1),
                rss,
                per_uplink,
            ),
            flush=True,
        )
        print(_line("herd", hm, _per_batch(b1, b2), rss, per_uplink), flush=True)
        after = await sizes(db_url)
        wal = await wal_bytes(db_url, before[6])
        d_readings, d_uplinks = after[4] - before[4], after[5] - before[5]
        done = sm.done + hm.done
        total_s = sm.elapsed_s + hm.elapsed_s
        collector_us = (sm.us("server") * sm.done + hm.us("server") * hm.done) / max(done, 1)
        db_us = (sm.us("db") * sm.done + hm.us("db") * hm.done) / max(done, 1)
        print(
            f"city_day: uplinks={done} of {len(city)} stored_uplinks={d_uplinks}"
            f" readings={d_readings} (expected {readings}) in {total_s:.0f}s;"
            f" sustained_uplinks_per_s={hm.bulk_rate():.0f}"
            f" sustained_readings_per_s={hm.bulk_rate() * per_uplink:.0f}"
            f" cpu_us_per_uplink={collector_us:.0f} db_cpu_us_per_uplink={db_us:.0f}",
            flush=True,
        )
        heap, idx = after[0] - before[0], after[1] - before[1]
        print(
            f"bytes_per_reading={(heap + idx) / max(d_readings, 1):.1f}"
            f" (heap {heap / max(d_readings, 1):.1f} + indexes {idx / max(d_readings, 1):.1f})"
            f" raw_archive_bytes_per_uplink={(after[2] - before[2]) / max(d_uplinks, 1):.0f}"
            f" oscore_answers_bytes_per_uplink={(after[3] - before[3]) / max(d_uplinks, 1):.0f}"
            f" wal_bytes_per_uplink={wal / max(d_uplinks, 1):.0f}"
            " (server-wide WAL: an upper bound)",
            flush=True,
        )

        await compacted(db_url, datetime.fromtimestamp(day_s, UTC))

        # 3. the billing side
        await billing_side(db_url, tenant, datetime.fromtimestamp(day_s, UTC).date())

        # at Shenzhen's 7.4k uplinks/s the collector is saturated, as in the herd: its
        # batches are large; the paced share's small batches cost more per uplink but
        # leave the machine idle in between, so they do not bound the day
        h_collector, h_db = hm.us("server"), hm.us("db")
        per_uplink_us = h_collector + h_db
        cpu_hours = SHENZHEN_UPLINKS * per_uplink_us / 1e6 / 3600
        busy = hm.bulk_rate() * (per_uplink_us + hm.us("generator")) / 1e6
        print(
            f"projection: a Shenzhen day = {SHENZHEN_UPLINKS:,} OSCORE uplinks at"
            f" {per_uplink_us:.0f} CPU µs each as in the herd (collector {h_collector:.0f}"
            f" + PostgreSQL {h_db:.0f}; the whole day's mean is {collector_us + db_us:.0f});"
            " CPU per uplink is the robust figure on this loaded machine (load average"
            f" {load_average()}) = {cpu_hours:.1f} CPU-hours:"
            f" {cpu_hours / MACHINE_CORES:.2f} h on this {MACHINE_CORES}-core machine,"
            f" cores_for_1h={cpu_hours:.1f}; measured herd rate {hm.bulk_rate():.0f}/s ->"
            f" {SHENZHEN_UPLINKS / max(hm.bulk_rate(), 1e-9) / 3600:.1f} h at that rate,"
            f" with this load generator on the same cores ({hm.us('generator'):.0f} µs per"
            f" uplink: {busy:.2f} of {MACHINE_CORES} cores busy in the herd)",
            flush=True,
        )
        plain_us = p.us("server") + p.us("db")
        print(
            "plain_coap_shenzhen_day_hours="
            f"{SHENZHEN_UPLINKS * plain_us / 1e6 / 3600 / MACHINE_CORES:.2f}"
        )
        print(f"shenzhen_day_hours={cpu_hours / MACHINE_CORES:.2f}")
    finally:
        if args.keep:
            print(f"# kept database {name}")
        else:
            await drop_database(server_url, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=200_000)
    parser.add_argument("--herd", type=float, default=0.3, help="share arriving after an outage")
    parser.add_argument(
        "--spread-load", type=float, default=0.8, help="paced rate / OSCORE closed-loop rate"
    )
    parser.add_argument(
        "--budget-s", type=float, default=780, help="pace the spread share to end by then"
    )
    parser.add_argument("--compare", type=int, default=20_000, help="uplinks per comparison")
    parser.add_argument(
        "--compare-rounds", type=int, default=5, help="alternating plain/OSCORE rounds (medians)"
    )
    parser.add_argument("--window", type=int, default=400, help="CONs outstanding (compare)")
    parser.add_argument("--herd-window", type=int, default=1000, help="devices waiting at once")
    parser.add_argument("--sockets", type=int, default=16)
    parser.add_argument(
        "--collectors", type=int, default=1, help="collector processes on the port (city day)"
    )
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--compare-only", action="store_true", help="phase 1 only (profiling)")
    parser.add_argument(
        "--no-lane", action="store_true", help="collectors without the uplink lane (aiocoap only)"
    )
    asyncio.run(main(parser.parse_args()))
