"""The export cut into segments over several connections: same bytes, in order, cleaned up."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from apihelpers import daily, local

from api.settings import ApiSettings
from storage import billing
from storage.errors import RowRefusedError
from storage.export import stream_cycle

SH, BERLIN = "Asia/Shanghai", "Europe/Berlin"
CYCLE, END = date(2024, 2, 1), date(2024, 3, 1)


async def _fleet(pool, make_tenant, add_meter, add_readings, n=23):
    """n meters, every fifth in Berlin (a second per-zone query)."""
    t = await make_tenant(SH)
    for i in range(n):
        zone = BERLIN if i % 5 == 4 else None
        m = await add_meter(t.tenant_id, timezone=zone)
        start = local(zone or SH, 2024, 1, 30) - timedelta(hours=i)
        await add_readings(m, daily(start, 33, 1_000_000 * i, 10_000 * (i + 1)))
    tuning = ApiSettings(database_url="unused").tuning()
    zones = await billing.zones(pool, t.tenant_id)
    return [billing.CycleQuery(t.tenant_id, CYCLE, END, z, tuning).args() for z in zones]


async def _body(pool, queries, fmt, **kw) -> bytes:
    return b"".join([chunk async for chunk in stream_cycle(pool, queries, fmt, **kw)])


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
async def test_segments_over_connections_give_the_same_export(
    pool, make_tenant, add_meter, add_readings, fmt
):
    """Segments of 1, 3 and 7 meters on 1-4 connections: byte for byte the one-COPY export."""
    queries = await _fleet(pool, make_tenant, add_meter, add_readings)
    whole = await _body(pool, queries, fmt, connections=1, segment=10**6)
    assert whole.count(b"\n") == 23 + (fmt == "csv")
    for segment, connections in ((1, 4), (3, 2), (7, 3), (23, 2)):
        got = await _body(pool, queries, fmt, connections=connections, segment=segment)
        assert got == whole, (segment, connections)


async def test_stopping_early_returns_every_connection(pool, make_tenant, add_meter, add_readings):
    """A client that goes away after the first chunk: COPYs cancelled, connections back."""
    queries = await _fleet(pool, make_tenant, add_meter, add_readings, n=12)
    idle = pool.get_idle_size() + (pool.get_max_size() - pool.get_size())
    stream = stream_cycle(pool, queries, "ndjson", connections=3, segment=1)
    first = await anext(stream)
    assert first.startswith(b"{")
    await stream.aclose()
    assert pool.get_idle_size() + (pool.get_max_size() - pool.get_size()) == idle
    # and the pool still serves the whole export afterwards
    body = await _body(pool, queries, "ndjson", connections=3, segment=2)
    assert body.count(b"\n") == 12


async def test_an_error_in_a_segment_reaches_the_consumer(
    pool, make_tenant, add_meter, add_readings
):
    """A failing COPY (here: an argument asyncpg cannot encode) raises in the stream."""
    queries = await _fleet(pool, make_tenant, add_meter, add_readings, n=6)
    broken = [*queries[0][:5], "no interval", *queries[0][6:]]
    with pytest.raises(RowRefusedError, match=r"\$6"):
        await _body(pool, [queries[0], tuple(broken)], "ndjson", connections=2, segment=2)
