"""The collector's analytics task: runs on its own pool until stopped, raises a silent
alarm from the raw archive's last-seen table, and exports its Prometheus figures."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
from prometheus_client import REGISTRY

from collector import analytics
from collector.settings import AnalyticsSettings
from storage import alarms


def _sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    return 0.0 if value is None else value


async def test_task_raises_silent_and_counts(
    db_url: str, pool: asyncpg.Pool, tenant_id: int
) -> None:
    """A meter last heard 4 days ago gets a silent alarm from the running task; the run
    histogram, the silent gauge and the alarm counter move."""
    meter = await pool.fetchval(
        "INSERT INTO meters (tenant_id, address, kind, format) VALUES ($1, 'quiet', 'water',"
        " 'cjt188') RETURNING meter_id",
        tenant_id,
    )
    await pool.execute(
        "INSERT INTO raw_uplinks (received_at, tenant_id, meter_id, transport, payload, outcome)"
        " VALUES ($1, $2, $3, 5, '\\x00', 'stored')",
        datetime.now(UTC) - timedelta(days=4),
        tenant_id,
        meter,
    )
    runs = _sample("nbmeter_analytics_run_seconds_count")
    stop = asyncio.Event()
    task = asyncio.create_task(analytics.run(db_url, AnalyticsSettings(every_s=0.05), stop))
    for _ in range(200):
        if await alarms.list_alarms(pool, tenant_id):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 30)
    [alarm] = await alarms.list_alarms(pool, tenant_id)
    assert (alarm["meter_id"], alarm["kind"]) == (meter, "silent")
    assert _sample("nbmeter_analytics_run_seconds_count") > runs
    assert _sample("nbmeter_silent_meters") >= 1
    labels = {"kind": "silent", "change": "raised"}
    assert REGISTRY.get_sample_value("nbmeter_analytics_alarms_total", labels) >= 1
