"""`nbmeter demo --ingest-only`: a demo tenant's fleet, a day of frames, decoded and stored.

The steps a collector takes, in-process: encode a CJ/T 188 frame per meter and hour,
decode the batch with the vectorized decoder, resolve addresses, write the readings with
the idempotent COPY writer, then write the same batch again to show that a replay stores
nothing. Prints what it did and a summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime, timedelta

import numpy as np

from decoder import decode_batch
from decoder.encode_cjt188 import encode_cjt188
from nbmeter.commands._env import database_url
from storage.demo_fleet import count_tenant_readings, ensure_demo_fleet
from storage.errors import StorageError
from storage.ingest import ReadingWriter
from storage.meters import MeterDirectory
from storage.pool import create_pool
from storage.rows import ReadingBatch

DEMO_TENANT = "demo"


def _say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def _frames(addresses: list[str], hours: int, start: datetime) -> tuple[list[bytes], int]:
    rng = np.random.default_rng(7)
    # hourly use in units of 10 L (CJ/T 188 registers count 0.01 m3)
    use_10l = rng.poisson(3, size=(len(addresses), hours)).cumsum(axis=1)
    base_10l = rng.integers(1_000, 500_000, size=len(addresses))
    frames = [
        encode_cjt188(
            address=address,
            total_ml=int(base_10l[m] + use_10l[m, h]) * 10_000,
            clock=start + timedelta(hours=h + 1),
        )
        for m, address in enumerate(addresses)
        for h in range(hours)
    ]
    return frames, len(frames)


async def _run(meters: int, hours: int) -> int:
    pool = await create_pool(database_url(), min_size=1, max_size=4)
    async with pool:
        addresses = [f"{20260000000000 + i:014d}" for i in range(meters)]
        tenant_id = await ensure_demo_fleet(pool, DEMO_TENANT, "Demo water utility", addresses)
        _say(f"tenant '{DEMO_TENANT}' with {meters} water meters (CJ/T 188)")
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(
            hours=hours
        )
        t0 = time.perf_counter()
        frames, n = _frames(addresses, hours, start)
        t1 = time.perf_counter()
        decoded = decode_batch(frames, int(time.time()))
        t2 = time.perf_counter()
        _say(
            f"encoded {n} frames in {t1 - t0:.2f} s, decoded in {t2 - t1:.3f} s"
            f" ({n / max(t2 - t1, 1e-9):,.0f} frames/s)"
        )
        ids = await MeterDirectory(pool).resolve(tenant_id, decoded.address)
        batch = ReadingBatch.from_decoded(decoded, ids, received_at_us=int(time.time() * 1e6))
        writer = ReadingWriter(pool)
        first = await writer.write(batch)
        t3 = time.perf_counter()
        again = await writer.write(batch)
        stored = await count_tenant_readings(pool, tenant_id)
    _say(f"wrote {first.new} new readings in {t3 - t2:.2f} s ({first.duplicate} already stored)")
    _say(f"replayed the same batch: {again.new} new, {again.duplicate} duplicates")
    print(
        f"demo summary: {meters} meters, {n} frames, {int(decoded.ok.sum())} decoded, "
        f"{first.new} new readings, replay stored {again.new}, "
        f"{stored} readings for tenant '{DEMO_TENANT}' in TimescaleDB"
    )
    return 0


def run_ingest_demo(args: argparse.Namespace) -> int:
    """Run the in-process ingest demo; 1 with a message when storage fails."""
    try:
        return asyncio.run(_run(args.meters, args.hours))
    except StorageError as exc:
        print(f"nbmeter demo: {exc}", file=sys.stderr)
        return 1
