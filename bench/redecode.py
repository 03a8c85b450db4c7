"""Re-decode: how soon a request is taken, and how fast a bulk job drains.

    python bench/redecode.py [--meters 500] [--frames-per-meter 10] [--batch-max 100]

Needs NBMETER_DATABASE_URL (a TimescaleDB server; a scratch database is created and
dropped). It quarantines meters x frames OMS mode 5 frames as `no_key` through the
collector's store path (plain CoAP uplinks of a lab tenant, each received at its own
time), provisions every meter's AES key, starts a collector in this process, then
measures: the time from one single-row request to its job being done (NOTIFY wake-up,
claim, commit, record), and a bulk job over every other row (frames/s). Last, the same
bulk request again: it finds nothing open and stores nothing. Printed: `single_ms=`,
`bulk_frames=`, `bulk_s=`, `bulk_frames_per_s=`, `readings_new=`, `again_items=`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.keys import MeterKeys
from collector.main import run
from collector.settings import (
    CoapSettings,
    CollectorSettings,
    RedecodeSettings,
)
from collector.store import BatchStore
from collector.uplink import Transport, Uplink
from decoder.mbus_encode import encode_oms_mode5
from storage import credentials, quarantine
from storage.migrate import migrate
from storage.reasons import Reason

HOUR0 = int(datetime(2025, 6, 1, tzinfo=UTC).timestamp())


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_done(pool: asyncpg.Pool, tenant_id: int, job_id: int) -> quarantine.Job:
    while True:
        job = await quarantine.get_job(pool, tenant_id, job_id)
        assert job is not None
        if job.state != "queued":
            return job
        await asyncio.sleep(0.005)


async def bench(args: argparse.Namespace, db_url: str) -> None:
    kek_text = credentials.new_key()
    kek = credentials.parse_key(kek_text)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    tenant_id = await pool.fetchval(
        "INSERT INTO tenants (slug, name, allow_plain_coap) VALUES ('bench', 'bench', true)"
        " RETURNING tenant_id"
    )
    addresses = [f"{i:08d}" for i in range(10_000_000, 10_000_000 + args.meters)]
    keys = {a: secrets.token_bytes(16) for a in addresses}
    async with pool.acquire() as conn:
        ids = [
            await credentials.ensure_meter(conn, tenant_id, a, kind="water", fmt="oms")
            for a in addresses
        ]
    store = BatchStore(pool, MeterKeys(kek))
    started = time.monotonic()
    uplinks = [
        Uplink(
            encode_oms_mode5(
                a, "NBM", 1, 0x07, 0x21, 1_000_000 * (n + 1), keys[a],
                datetime.fromtimestamp(HOUR0 + 3600 * n, UTC),
            ),
            Transport.COAP,
            "[::1]:1",
            tenant_id=tenant_id,
            received_at=HOUR0 + 3600 * n + 60,
        )
        for n in range(args.frames_per_meter)
        for a in addresses
    ]  # fmt: skip
    for i in range(0, len(uplinks), 500):
        outcomes = await store.commit(uplinks[i : i + 500])
        assert all(o.reason == "undecodable" for o in outcomes), outcomes[0]
    print(f"quarantined={len(uplinks)} in {time.monotonic() - started:.1f}s")
    async with pool.acquire() as conn:
        for a, meter_id in zip(addresses, ids, strict=True):
            ref = credentials.MeterRef(meter_id, tenant_id, a)
            await credentials.store_aes_key(conn, kek, ref, keys[a])
    settings = CollectorSettings(
        database_url=db_url,
        mqtt_url=None,
        credentials_key=kek_text,  # type: ignore[arg-type]
        metrics_port=0,
        coap=CoapSettings(host="127.0.0.1", port=_free_udp_port()),
        redecode=RedecodeSettings(batch_max=args.batch_max),
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop, started=ready))
    await asyncio.wait_for(ready.wait(), 20)
    await asyncio.sleep(0.5)  # the re-decode task's listener connects
    try:
        first = await pool.fetchval(
            "SELECT quarantine_id FROM quarantine ORDER BY quarantine_id LIMIT 1"
        )
        t0 = time.perf_counter()
        async with pool.acquire() as conn:
            job = await quarantine.request_one(conn, tenant_id, first, "bench")
        assert job is not None
        done = await _wait_done(pool, tenant_id, job.job_id)
        print(f"single_ms={(time.perf_counter() - t0) * 1000:.0f} state={done.state}")
        flt = quarantine.Filter(reason=Reason.UNDECODABLE, error="no_key")
        t0 = time.perf_counter()
        async with pool.acquire() as conn:
            job = await quarantine.request_matching(conn, tenant_id, flt, "bench")
        done = await _wait_done(pool, tenant_id, job.job_id)
        took = time.perf_counter() - t0
        print(
            f"bulk_frames={job.n_items} bulk_s={took:.2f}"
            f" bulk_frames_per_s={job.n_items / took:.0f} state={done.state}"
            f" stored={done.counts['stored']} readings_new={done.n_new}"
        )
        async with pool.acquire() as conn:
            again = await quarantine.request_matching(conn, tenant_id, flt, "bench")
        readings = await pool.fetchval("SELECT count(*) FROM readings")
        print(f"again_items={again.n_items} readings_total={readings}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await pool.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=500)
    parser.add_argument("--frames-per-meter", type=int, default=10)
    parser.add_argument("--batch-max", type=int, default=100)
    args = parser.parse_args()
    server = os.environ["NBMETER_DATABASE_URL"]
    name = f"nbmeter_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db_url = urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    try:
        await migrate(db_url)
        await bench(args, db_url)
    finally:
        admin = await asyncpg.connect(server)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
