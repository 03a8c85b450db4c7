"""The analytics run, every `analytics.every_s`, as a task of the collector.

Why the collector: it is the long-running daemon (the API may run many workers, restarted
at each deploy), and the alarms the run raises go out through the dispatcher beside it.
Why not inside the dispatcher's loop: a day's rollup of a large tenant takes seconds to
minutes, and the dispatcher must deliver an alarm within a second of its commit; so this
is its own task with its own one-connection pool. Several collectors are safe: the run
takes an advisory lock and the others skip. `nbmeter analytics run` does the same once,
and recomputes given days (late data, a backfill).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from collector import metrics
from collector.settings import AnalyticsSettings
from storage import analytics
from storage.errors import StorageError
from storage.pool import Pool, create_pool, keep_session

log = structlog.get_logger("collector.analytics")


async def run_once(pool: Pool) -> analytics.RunReport:
    """One run (the finished days not yet rolled up, then silent meters); metrics updated."""
    started = time.monotonic()
    report = await analytics.run(pool)
    if report.skipped:
        return report
    metrics.ANALYTICS_SECONDS.observe(time.monotonic() - started)
    metrics.ANALYTICS_DAYS.inc(len(report.days))
    metrics.SILENT_METERS.set(report.silent)
    for kind, n in report.raised.items():
        metrics.ANALYTICS_ALARMS.labels(kind, "raised").inc(n)
    for kind, n in report.cleared.items():
        metrics.ANALYTICS_ALARMS.labels(kind, "cleared").inc(n)
    if report.days or any(report.raised.values()):
        log.info("analytics.ran", days=len(report.days), raised=report.raised,
                 cleared=report.cleared, silent=report.silent)  # fmt: skip
    return report


async def run(database_url: str, settings: AnalyticsSettings, stop: asyncio.Event) -> None:
    """Run every `every_s` until `stop` is set; database outages are waited out."""
    pool = await create_pool(
        database_url, min_size=0, max_size=1, connect_timeout_s=5.0,
        command_timeout_s=settings.command_timeout_s, reset=keep_session,
    )  # fmt: skip
    try:
        while not stop.is_set():
            try:
                await run_once(pool)
            except StorageError as exc:
                log.warning("analytics.failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.every_s)
    finally:
        await pool.close()
